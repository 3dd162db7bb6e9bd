"""Prove the sandbox namespace is closed: nothing but ``lo`` has an address or a route.

``verify_closed_namespace()`` reads links, addresses and routes (IPv4 and IPv6, every
routing table) over rtnetlink with pyroute2, then hands plain data to the pure
``check_state()``. pyroute2 is imported lazily: its package ``__init__`` imports the
whole library (~120-150 ms and ~22 MB here), and importing a submodule such as
``pyroute2.iproute.linux`` runs that ``__init__`` all the same, so there is no cheaper
import short of stubbing the package in ``sys.modules``, which we do not do.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading

from agentpen.core.record import asdict, record
from agentpen.workers.netns.errors import NetnsSetupError

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

# rtnetlink route types (linux/rtnetlink.h) that send nothing anywhere.
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3
RTN_ANYCAST = 4
RTN_MULTICAST = 5
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RTN_PROHIBIT = 8
_DEAD_END = {RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT}
IFF_UP = 0x1
LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@record(frozen=True)
class Link:
    index: int
    name: str
    up: bool


@record(frozen=True)
class Address:
    index: int
    family: int
    address: str
    prefixlen: int


@record(frozen=True)
class Route:
    family: int
    table: int
    type: int
    dst: str | None
    dst_len: int
    oif: int | None
    gateway: str | None = None
    multipath: bool = False


def check_state(links: list[Link], addresses: list[Address], routes: list[Route], *,
                allowed_loopback_only: bool = True) -> list[str]:
    """Pure: what is wrong with this namespace's network state (empty: closed)."""
    problems: list[str] = []
    by_index = {link.index: link for link in links}
    lo = [link.index for link in links if link.name == "lo"]
    if len(lo) != 1:
        problems.append(f"expected exactly one loopback link 'lo', found {len(lo)}")
    lo_index = lo[0] if lo else -1

    def name(index: int | None) -> str:
        link = by_index.get(index) if index is not None else None
        return link.name if link else f"#{index}"

    for addr in addresses:
        if addr.index != lo_index:
            problems.append(f"{name(addr.index)} has address {addr.address}/{addr.prefixlen}")
            continue
        if allowed_loopback_only:
            try:
                ip = ipaddress.ip_address(addr.address)
            except ValueError:
                problems.append(f"lo has an unparsable address {addr.address!r}")
                continue
            if not any(ip in net for net in LOOPBACK_NETS):
                problems.append(f"lo carries a non-loopback address {addr.address}")
    for route in routes:
        where = f"table {route.table} {route.dst or 'default'}/{route.dst_len}"
        if route.type in _DEAD_END:
            continue  # blackhole/unreachable/prohibit: a route that closes, not opens
        if route.dst_len == 0:
            problems.append(f"default route ({where} via {name(route.oif)})")
            continue
        if route.multipath:
            problems.append(f"multipath route {where}")
        if route.gateway:
            problems.append(f"route {where} via gateway {route.gateway}")
        if route.oif != lo_index:
            problems.append(f"route {where} on {name(route.oif)}, not lo")
    return problems


_preload: threading.Thread | None = None


def preload_in_background() -> threading.Thread:
    """Start importing pyroute2 in a daemon thread, so that its cost overlaps with work
    that waits (the CONFIG round trip, nft). ``verify_closed_namespace()`` joins it, so no
    thread is left running when the worker forks the jail."""
    global _preload
    if _preload is None:
        def load() -> None:
            with contextlib.suppress(ImportError):  # reported by _collect(), fail closed
                import pyroute2  # noqa: F401
        _preload = threading.Thread(target=load, name="pyroute2-preload", daemon=True)
        _preload.start()
    return _preload


def _collect() -> tuple[list[Link], list[Address], list[Route]]:
    if _preload is not None:
        _preload.join()
    try:
        from pyroute2 import IPRoute  # lazy: ~120-150 ms, off the import path of callers
    except ImportError as exc:
        raise NetnsSetupError(
            f"pyroute2 is not importable: {exc}",
            "install agentpen with its dependencies (pip install pyroute2)",
        ) from exc
    links: list[Link] = []
    addresses: list[Address] = []
    routes: list[Route] = []
    try:
        with IPRoute() as ipr:
            for msg in ipr.get_links():
                links.append(Link(int(msg["index"]), str(msg.get_attr("IFLA_IFNAME")),
                                  bool(msg["flags"] & IFF_UP)))
            for msg in ipr.get_addr():
                addresses.append(Address(int(msg["index"]), int(msg["family"]),
                                         str(msg.get_attr("IFA_ADDRESS")),
                                         int(msg["prefixlen"])))
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in ipr.route("dump", family=family):  # every table, not just main
                    table = msg.get_attr("RTA_TABLE")
                    routes.append(Route(
                        family=int(family),
                        table=int(table if table is not None else msg["table"]),
                        type=int(msg["type"]),
                        dst=msg.get_attr("RTA_DST"),
                        dst_len=int(msg["dst_len"]),
                        oif=msg.get_attr("RTA_OIF"),
                        gateway=msg.get_attr("RTA_GATEWAY"),
                        multipath=msg.get_attr("RTA_MULTIPATH") is not None,
                    ))
    except OSError as exc:
        raise NetnsSetupError(f"could not read links, addresses or routes: {exc}",
                              "run the check inside the sandbox's network namespace") from exc
    return links, addresses, routes


def _collect_stdlib() -> tuple[list[Link], list[Address], list[Route]]:
    from agentpen.workers.netns import rtnl

    raw_links, raw_addrs, raw_routes = rtnl.collect()
    links = [Link(index, name, bool(flags & IFF_UP)) for index, name, flags in raw_links]
    addresses = [Address(*a) for a in raw_addrs]
    routes = [Route(**r) for r in raw_routes]  # type: ignore[arg-type]
    return links, addresses, routes


def verify_closed_namespace(allowed_loopback_only: bool = True, *,
                            backend: str = "pyroute2") -> dict[str, Any]:
    """Read this namespace's links, addresses and routes; raise NetnsSetupError unless
    nothing but ``lo`` has an address or a route and there is no default route.

    ``backend="stdlib"`` reads them with ``rtnl`` (no pyroute2 import: ~120-280 ms less
    start-up); both backends are tested to agree. Returns the verified state, for the
    audit stream."""
    if backend == "pyroute2":
        links, addresses, routes = _collect()
    elif backend == "stdlib":
        links, addresses, routes = _collect_stdlib()
    else:
        raise ValueError(f"unknown backend {backend!r}")
    problems = check_state(links, addresses, routes, allowed_loopback_only=allowed_loopback_only)
    if problems:
        raise NetnsSetupError(
            "the sandbox network namespace is not closed: " + "; ".join(problems[:8]),
            "pasta must run without --config-net, --address, --gateway or any route "
            "options; if your pasta configures the interface by itself, report it",
        )
    return describe(links, addresses, routes)


def describe(links: list[Link], addresses: list[Address], routes: list[Route]) -> dict[str, Any]:
    """Pure: a compact JSON description of a verified state."""
    names = {link.index: link.name for link in links}
    return {
        "closed": True,
        "links": [asdict(link) for link in links],
        "addresses": [{"link": names.get(a.index, a.index), "address": a.address,
                       "prefixlen": a.prefixlen} for a in addresses],
        "routes": {
            "ipv4": sum(1 for r in routes if r.family == socket.AF_INET),
            "ipv6": sum(1 for r in routes if r.family == socket.AF_INET6),
            "all_on_loopback": True,
        },
        "default_route": False,
    }
