"""The closed-namespace check (pure part)."""

from __future__ import annotations

import socket

from agentpen.workers.netns.verify import (
    RTN_BROADCAST,
    RTN_LOCAL,
    RTN_UNICAST,
    RTN_UNREACHABLE,
    Address,
    Link,
    Route,
    check_state,
    describe,
)

V4, V6 = socket.AF_INET, socket.AF_INET6
LINKS = [Link(1, "lo", True), Link(2, "eth0", False)]
ADDRS = [Address(1, V4, "127.0.0.1", 8), Address(1, V6, "::1", 128)]
# what a fresh pasta namespace holds (measured): the local table only, all on lo
ROUTES = [Route(V4, 255, RTN_LOCAL, "127.0.0.0", 8, 1),
          Route(V4, 255, RTN_LOCAL, "127.0.0.1", 32, 1),
          Route(V4, 255, RTN_BROADCAST, "127.255.255.255", 32, 1),
          Route(V6, 255, RTN_LOCAL, "::1", 128, 1)]


def test_fresh_pasta_namespace_is_closed():
    assert check_state(LINKS, ADDRS, ROUTES) == []
    state = describe(LINKS, ADDRS, ROUTES)
    assert state["closed"] and state["routes"] == {"ipv4": 3, "ipv6": 1, "all_on_loopback": True}


def test_address_on_eth0():
    problems = check_state(LINKS, [*ADDRS, Address(2, V4, "10.0.2.15", 24)], ROUTES)
    assert problems == ["eth0 has address 10.0.2.15/24"]


def test_ipv6_link_local_on_eth0():
    assert check_state(LINKS, [*ADDRS, Address(2, V6, "fe80::1", 64)], ROUTES)


def test_default_routes_v4_and_v6():
    for fam, gw in ((V4, "10.0.2.2"), (V6, "fe80::1")):
        problems = check_state(LINKS, ADDRS, [*ROUTES, Route(fam, 254, RTN_UNICAST, None, 0, 2,
                                                              gateway=gw)])
        assert any("default route" in p for p in problems)


def test_default_route_in_another_table():
    problems = check_state(LINKS, ADDRS, [*ROUTES, Route(V4, 100, RTN_UNICAST, None, 0, 2)])
    assert any("table 100" in p for p in problems)


def test_subnet_route_on_eth0():
    problems = check_state(LINKS, ADDRS, [*ROUTES, Route(V4, 254, RTN_UNICAST, "10.0.0.0", 8, 2)])
    assert problems == ["route table 254 10.0.0.0/8 on eth0, not lo"]


def test_dead_end_routes_are_fine():
    closed = Route(V6, 254, RTN_UNREACHABLE, None, 0, None)
    assert check_state(LINKS, ADDRS, [*ROUTES, closed]) == []


def test_gateway_and_multipath_on_lo():
    r1 = Route(V4, 254, RTN_UNICAST, "192.0.2.0", 24, 1, gateway="127.0.0.2")
    r2 = Route(V4, 254, RTN_UNICAST, "198.51.100.0", 24, 1, multipath=True)
    problems = check_state(LINKS, ADDRS, [*ROUTES, r1, r2])
    assert any("gateway" in p for p in problems) and any("multipath" in p for p in problems)


def test_non_loopback_address_on_lo():
    bad = [*ADDRS, Address(1, V4, "192.0.2.1", 32)]
    assert check_state(LINKS, bad, ROUTES) == ["lo carries a non-loopback address 192.0.2.1"]
    assert check_state(LINKS, bad, ROUTES, allowed_loopback_only=False) == []


def test_no_loopback_link():
    assert check_state([Link(2, "eth0", False)], [], [])


def test_mechanism_reads_the_real_host_namespace():
    """Positive control for _collect: the host namespace (with an address on a non-lo
    link and a default route, here) must not pass as closed."""
    import pytest
    from agentpen.workers.netns.errors import NetnsSetupError
    from agentpen.workers.netns.verify import _collect, verify_closed_namespace

    links, addrs, routes = _collect()
    assert any(link.name == "lo" for link in links)
    if not check_state(links, addrs, routes):
        pytest.skip("this host namespace is itself closed: nothing to detect")
    with pytest.raises(NetnsSetupError) as exc:
        verify_closed_namespace()
    assert "not closed" in exc.value.what


def test_preload_imports_pyroute2_in_a_thread_that_is_joined():
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from agentpen.workers.netns import verify\n"
        "t = verify.preload_in_background()\n"
        "assert verify.preload_in_background() is t\n"
        "verify._collect()\n"
        "print(t.is_alive(), 'pyroute2' in sys.modules, threading.active_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["False", "True", "1"]
