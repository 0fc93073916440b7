"""The `p2pcache` command line."""
