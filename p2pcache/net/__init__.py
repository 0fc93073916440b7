"""The network side of a node: libp2p host, gossip, fetches, reputation, and the L2 and KV
tiers (see `p2pcache.net.service`). Nothing is imported here: libp2p is slow to import and
`p2pcache.net.config` must stay light."""
