"""Reachability checks and circuit relays on loopback: real py-libp2p hosts in separate
processes (tests/net_peer.py), no model.

- The dial-back protocol `/otd/reach/1.0.0` says reachable for a listening address and not
  reachable for a closed port *while the requester is connected to the checking peers* (the
  case py-libp2p's AutoNAT gets wrong), refuses to dial an IP other than the requester's,
  and rate-limits a requester.
- A node reserves a slot on a relay, advertises ``.../p2p-circuit/p2p/<id>``, and serves a
  fetch through the relay; with DCUtR the relayed connection is upgraded to a direct one and
  fetches keep working after the relay is gone.

The rules of the pure parts (which addresses are dialled back, how answers combine) are unit
tests at the top.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from p2pcache.cli.node import reach_fields
from p2pcache.net.reachability import PRIVATE, PUBLIC, UNKNOWN, PeerAnswer, combine, dial_target
from p2pcache.net.wire import LEN, pack_msg
from tests.net_harness import Peers, until

ME = "12D3KooWFtJUZXeZr4XAkTHgd1ANRqpjh2zvyqKCCqVhL6NqNHBw"
OTHER = "12D3KooWPSvxjVX33DRUexn8HXcarCSaqnuVjxz1sRyByZZ9LoqQ"


# -- unit: which addresses a server dials back ------------------------------------------------


def test_dial_target_only_the_requesters_ip_and_peer() -> None:
    assert dial_target("/ip4/10.0.0.5/tcp/4001", ME, "10.0.0.5") == ("/ip4/10.0.0.5/tcp/4001", "")
    assert dial_target(f"/ip4/10.0.0.5/tcp/4001/p2p/{ME}", ME, "10.0.0.5")[0] is not None
    # another IP: the server would be a DDoS amplifier aimed at a third party
    assert dial_target("/ip4/10.9.9.9/tcp/4001", ME, "10.0.0.5") == (None, "ip_mismatch")
    assert dial_target("/ip4/10.0.0.5/tcp/4001", ME, None) == (None, "ip_mismatch")
    assert dial_target(f"/ip4/10.0.0.5/tcp/4001/p2p/{OTHER}", ME, "10.0.0.5") == (
        None,
        "wrong_peer",
    )
    for bad in ("/ip6/::1/tcp/1", "/ip4/10.0.0.5/udp/1", "garbage", "/ip4/10.0.0.5/tcp/1" * 40):
        assert dial_target(bad, ME, "10.0.0.5") == (None, "unsupported"), bad
    relayed = f"/ip4/10.0.0.5/tcp/1/p2p/{OTHER}/p2p-circuit/p2p/{ME}"
    assert dial_target(relayed, ME, "10.0.0.5") == (None, "unsupported")


# -- unit: combining answers ------------------------------------------------------------------


def _ans(peer: str, **results: bool) -> PeerAnswer:
    return PeerAnswer(peer, {f"/a/{k}": v for k, v in results.items()})


def test_combine_two_of_three() -> None:
    addrs = ["/a/x", "/a/y"]
    v = combine(addrs, [_ans("p1", x=True, y=False), _ans("p2", x=True, y=False)], 2, 0.0)
    assert v.status == PUBLIC and v.addrs["/a/x"]["reachable"] is True
    assert v.addrs["/a/y"]["reachable"] is False
    v = combine(addrs, [_ans("p1", x=False, y=False), _ans("p2", x=False, y=False)], 2, 0.0)
    assert v.status == PRIVATE and "2/2 peers could not dial" in v.summary()
    # one yes is not enough, one no is not enough: unknown
    v = combine(addrs, [_ans("p1", x=True, y=False), _ans("p2", x=False, y=False)], 2, 0.0)
    assert v.status == UNKNOWN
    v = combine(addrs, [_ans("p1", x=False, y=False), PeerAnswer("p2", error="rate")], 2, 0.0)
    assert v.status == UNKNOWN and "rate" in v.summary()
    # 2 of 3 agree: public even though the third could not dial
    answers = [_ans("p1", x=True), _ans("p2", x=False), _ans("p3", x=True)]
    assert combine(["/a/x"], answers, 2, 0.0).status == PUBLIC
    assert combine([], [], 2, 0.0).status == UNKNOWN


# -- processes ------------------------------------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on (bound then released; racy only in theory)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def peers() -> Iterator[Peers]:
    with Peers() as ps:
        yield ps


def test_dial_back_is_not_fooled_by_an_existing_connection(peers: Peers) -> None:
    b = peers.start("--reach", "--reach-per-peer-s", "0")
    c = peers.start("--reach", "--reach-per-peer-s", "0")
    # a asks; it does not serve dial-backs or run its own checks (the test drives them)
    a = peers.start("--no-reach", "--bootstrap", b.addr, "--bootstrap", c.addr)
    a.call("wait_peers", n=2, timeout_s=20)
    helpers = [b.peer_id, c.peer_id]

    v = a.call("reach", peers=helpers, timeout=60)["verdict"]
    assert v["status"] == "public", v
    assert v["addrs"][a.addr]["yes"] == 2, v

    # a is connected to both, and claims a port where nothing listens: AutoNAT v1 would
    # say reachable (its dial-back reuses the connection); ours dials from a fresh host.
    closed = f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{a.peer_id}"
    assert b.peer_id in a.call("stats")["peers"]
    v = a.call("reach", peers=helpers, addrs=[closed], timeout=60)["verdict"]
    assert v["status"] == "private", v
    assert v["addrs"][closed] == {"reachable": False, "yes": 0, "no": 2}
    assert all(p["reasons"][closed].startswith("failed") for p in v["peers"]), v

    # another IP than the one the request comes from is never dialled
    elsewhere = "/ip4/10.255.0.1/tcp/4001"
    v = a.call("reach", peers=helpers, addrs=[elsewhere], timeout=60)["verdict"]
    assert v["status"] == "private" and all(
        p["reasons"][elsewhere] == "ip_mismatch" for p in v["peers"]
    ), v
    # ...and another peer's identity at our IP is not dialled either
    wrong = f"/ip4/127.0.0.1/tcp/{b.addr.split('/tcp/')[1].split('/')[0]}/p2p/{b.peer_id}"
    v = a.call("reach", peers=[c.peer_id], addrs=[wrong], timeout=60)["verdict"]
    assert v["peers"][0]["reasons"][wrong] == "wrong_peer", v

    stats = b.call("reach_state")["reach_server"]
    assert stats["dialed_ok"] >= 1 and stats["dialed_failed"] >= 1 and stats["ip_mismatch"] >= 1


def test_dial_back_service_rate_limits_each_peer(peers: Peers) -> None:
    d = peers.start("--reach", "--reach-per-peer-s", "600")
    a = peers.start("--no-reach", "--bootstrap", d.addr)
    a.call("wait_peers", n=1, timeout_s=20)
    first = a.call("reach", peers=[d.peer_id], timeout=60)["verdict"]
    assert first["peers"][0]["error"] == "" and first["peers"][0]["results"][a.addr] is True
    second = a.call("reach", peers=[d.peer_id], timeout=60)["verdict"]
    assert second["peers"][0]["error"] == "rate", second
    assert d.call("reach_state")["reach_server"]["refused_rate"] == 1
    assert d.alive()


def test_dial_back_service_survives_bad_requests(peers: Peers) -> None:
    d = peers.start("--reach", "--reach-per-peer-s", "0")
    a = peers.start("--no-reach", "--bootstrap", d.addr)
    a.call("wait_peers", n=1, timeout_s=20)

    def raw(payload: bytes) -> dict:  # type: ignore[type-arg]
        return a.call("raw_reach", peer=d.peer_id, data_hex=payload.hex(), timeout=60)

    assert raw(b"\xff" * 64)["reply"] is None  # a length far over the limit: reset
    assert raw(pack_msg({"addrs": "not a list"}))["reply"] == {"error": "bad_request"}
    assert raw(pack_msg({"addrs": [1, 2]}))["reply"] == {"error": "bad_request"}
    assert raw(LEN.pack(3) + b"\xc1\xc1\xc1")["reply"] is None  # not msgpack
    # many addresses: only the first max_addrs (8) are looked at, none of them dialled here
    many = [f"/ip4/10.255.0.{i}/tcp/1" for i in range(200)]
    reply = raw(pack_msg({"addrs": many}))["reply"]
    assert len(reply["results"]) == 8 and all(
        r == {"ok": False, "why": "ip_mismatch"} for r in reply["results"].values()
    ), reply
    # still serving: an honest request is answered
    v = a.call("reach", peers=[d.peer_id], timeout=60)["verdict"]
    assert v["peers"][0]["results"][a.addr] is True, v
    assert d.call("reach_state")["reach_server"]["bad_requests"] >= 3


def test_status_rendering_of_reachability_and_relays() -> None:
    doc = {
        "reachability": {
            "status": "private",
            "checked_at": 0,
            "addrs": {"/ip4/10.0.0.5/tcp/4001": {"reachable": False, "yes": 0, "no": 2}},
            "peers": [{"error": ""}, {"error": ""}, {"error": "rate"}],
        },
        "relay": {
            "service": {"on": False, "mode": "auto"},
            "reservations": [{"relay": OTHER, "expires": 0}],
            "relayed_addrs": [f"/ip4/10.0.0.1/tcp/1/p2p/{OTHER}/p2p-circuit/p2p/{ME}"],
            "events": ["reserving"],
        },
        "discovery": {"enabled": True, "providers": [1, 2]},
    }
    rows = dict(reach_fields(doc))
    assert rows["reachability"].startswith("private (checked never, 2/3 peers answered)")
    assert rows["  per address"] == ["/ip4/10.0.0.5/tcp/4001  not reachable (0 dialled, 2 not)"]
    assert rows["relay service"] == "off (mode auto)"
    assert rows["relay slots"] == [f"{OTHER} until never"]
    assert rows["relayed addrs"] == doc["relay"]["relayed_addrs"]
    assert rows["discovery"] == ["enabled: True", "providers: 2"]
    assert reach_fields({}) == []  # an older node: nothing shown


def test_self_check_runs_and_a_public_node_turns_relay_service_on(peers: Peers) -> None:
    """Nodes with --reach check themselves once two peers are connected (auto: a public node
    then offers relay service)."""
    b = peers.start("--reach", "--reach-per-peer-s", "0")
    c = peers.start("--reach", "--reach-per-peer-s", "0", "--bootstrap", b.addr)
    a = peers.start("--reach", "--bootstrap", b.addr, "--bootstrap", c.addr)
    st = a.call("wait_reach", status="public", timeout_s=60, timeout=70)
    assert st["reachability"]["checked_at"] > 0
    assert st["relay"]["service"]["on"] is True and st["relay"]["service"]["mode"] == "auto"
    assert st["relay"]["reservations"] == []  # public: no relay slot needed


def _put_and_fetch(owner, fetcher, key: str, addrs: list[str]) -> dict:  # type: ignore[no-untyped-def]
    return fetcher.call("fetch", peer=owner.peer_id, key=key, addrs=addrs, timeout_s=15, timeout=40)


@pytest.mark.parametrize("psk", [None, "5a" * 32], ids=["open", "private-swarm"])
def test_fetch_through_a_relay(peers: Peers, psk: str | None) -> None:
    key_args = ("--psk", psk) if psk else ()
    r = peers.start("--relay-service", "on", *key_args)
    l_ = peers.start("--relay-service", "off", "--no-dcutr", "--bootstrap", r.addr, *key_args)
    d = peers.start("--relay-service", "off", "--no-dcutr", *key_args)
    l_.call("wait_peers", n=1, timeout_s=20)
    got = l_.call("reserve", addr=r.addr, timeout=30)
    assert got["reserved"] is True
    relayed = [a for a in got["addrs"] if "/p2p-circuit/" in a]
    assert relayed == [f"{r.addr}/p2p-circuit/p2p/{l_.peer_id}"], got["addrs"]
    assert got["addrs"][0] == relayed[0]  # advertised first
    state = l_.call("reach_state")["relay"]
    assert state["reservations"][0]["relay"] == r.peer_id
    assert state["relayed_addrs"] == relayed

    key = "ab" * 32
    l_.call("put_entry", key=key, text="through the relay")
    # d knows only the relayed address. (Two relayed connections may appear: d's warm dialer
    # can hear l's advert through the relay while this dial is under way.)
    assert set(d.call("dial", peer=l_.peer_id, addrs=relayed, timeout=30)["paths"]) == {"relayed"}
    res = _put_and_fetch(l_, d, key, relayed)
    assert res["fetched"] is True and res["entry"]["text"] == "through the relay", res
    # relayed is the only path there was, before and after the fetch
    assert set(d.call("paths", peer=l_.peer_id)["paths"]) == {"relayed"}
    served = r.call("reach_state")["relay"]["service"]
    assert served["on"] is True and served["reservations"] == 1


def test_relayed_connection_upgrades_to_direct(peers: Peers) -> None:
    r = peers.start("--relay-service", "on")
    l_ = peers.start("--relay-service", "off", "--bootstrap", r.addr)
    d = peers.start("--relay-service", "off")
    l_.call("wait_peers", n=1, timeout_s=20)
    relayed = [a for a in l_.call("reserve", addr=r.addr)["addrs"] if "/p2p-circuit/" in a]
    key = "cd" * 32
    l_.call("put_entry", key=key, text="direct after the punch")
    assert "relayed" in d.call("dial", peer=l_.peer_id, addrs=relayed, timeout=30)["paths"]
    # DCUtR (both sides run it) adds a direct connection
    until(
        lambda: "direct" in d.call("paths", peer=l_.peer_id)["paths"],
        30,
        "a direct connection from d to l after DCUtR",
    )
    r.stop()  # the relay is gone: only the direct connection can serve now
    res = _put_and_fetch(l_, d, key, relayed)
    assert res["fetched"] is True and res["entry"]["text"] == "direct after the punch", res
    assert set(d.call("paths", peer=l_.peer_id)["paths"]) == {"direct"}
