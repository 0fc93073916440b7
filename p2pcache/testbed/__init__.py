"""Network-namespace testbeds: real p2pcache nodes in Linux network namespaces joined by
bridges (optionally shaped links and NAT routers), for topology tests and benchmarks.

Needs root and iproute2. Every address lives in a private 10.0.0.0/8 subnet and no
namespace is ever linked to the host's own network, so nothing a testbed starts can reach
anything outside it.
"""

from p2pcache.testbed.netns import (
    Bridge,
    Link,
    LinkShape,
    Netns,
    Testbed,
    TestbedError,
    cleanup_prefix,
    netem_available,
    netns_available,
)

__all__ = [
    "Bridge",
    "Link",
    "LinkShape",
    "Netns",
    "Testbed",
    "TestbedError",
    "cleanup_prefix",
    "netem_available",
    "netns_available",
]
