"""The rendezvous server's bounds (`p2pcache.net.discovery.BoundedRendezvousService`): only our
namespaces, a bounded number of them, none created by lookups, and peers that are no longer
connected are not handed out. Real py-libp2p parts (host, service, messages), no network:
the discovery between processes is tests/test_netns_swarm.py."""

from __future__ import annotations

from pathlib import Path

import multiaddr
from libp2p.discovery.rendezvous.messages import (
    create_discover_message,
    create_register_message,
)
from libp2p.discovery.rendezvous.pb.rendezvous_pb2 import Message
from libp2p.peer.id import ID

from p2pcache.identity import Identity
from p2pcache.net.discovery import BoundedRendezvousService, providers_namespace
from p2pcache.net.host import HostConfig, build_host

MODEL = "ab" * 32
ADDR = multiaddr.Multiaddr("/ip4/10.77.0.2/tcp/4001")


def service(tmp_path: Path, max_namespaces: int = 2) -> BoundedRendezvousService:
    host = build_host(Identity.load_or_create(tmp_path / "id.key"), HostConfig())
    return BoundedRendezvousService(host, max_namespaces)


def peer(tmp_path: Path, name: str) -> ID:
    return ID.from_base58(Identity.load_or_create(tmp_path / f"{name}.key").peer_id)


def register(svc: BoundedRendezvousService, pid: ID, ns: str) -> int:
    msg = create_register_message(ns, pid, [ADDR], 120)
    return int(svc._handle_register(pid, msg.register).registerResponse.status)


def discover(svc: BoundedRendezvousService, asker: ID, ns: str) -> list[bytes]:
    resp = svc._handle_discover(asker, create_discover_message(ns, 100, b"").discover)
    assert resp.discoverResponse.status == Message.ResponseStatus.OK
    return [r.peer.id for r in resp.discoverResponse.registrations]


def test_only_our_namespaces_and_a_bounded_number_of_them(tmp_path: Path) -> None:
    svc = service(tmp_path, max_namespaces=2)
    p = peer(tmp_path, "p")
    ok, bad = Message.ResponseStatus.OK, Message.ResponseStatus.E_INVALID_NAMESPACE
    assert register(svc, p, "some-ipfs-app") == bad
    assert register(svc, p, providers_namespace(MODEL)) == ok
    assert register(svc, p, providers_namespace("cd" * 32)) == ok
    assert register(svc, p, providers_namespace("ef" * 32)) == bad  # the third namespace
    assert register(svc, p, providers_namespace(MODEL)) == ok  # known ones stay usable
    assert len(svc.registrations) == 2


def test_lookups_create_nothing_and_departed_peers_are_not_listed(tmp_path: Path) -> None:
    svc = service(tmp_path)
    asker = peer(tmp_path, "asker")
    for i in range(50):
        assert discover(svc, asker, providers_namespace(f"{i:064x}")) == []
    assert svc.registrations == {}
    ns = providers_namespace(MODEL)
    svc.register_self(ns, ["/ip4/10.77.0.1/tcp/4001"], 120)
    gone = peer(tmp_path, "gone")
    assert register(svc, gone, ns) == Message.ResponseStatus.OK
    # ``gone`` registered but is not connected to this (unstarted) host: a peer that left.
    listed = discover(svc, asker, ns)
    assert listed == [svc.host.get_id().to_bytes()]
    assert gone not in svc.registrations[ns]
