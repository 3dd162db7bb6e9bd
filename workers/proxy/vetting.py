"""Upstream address vetting (pure): only globally routable unicast addresses are dialled.

An explicit table gives each refusal its reason; anything ipaddress does not call
global is refused as well, and IPv6 outside 2000::/3 is refused outright (fail
closed on whatever IANA assigns next). Embedded IPv4 is judged as IPv4:
IPv4-mapped (::ffff:a.b.c.d), SIIT-translated (::ffff:0:a.b.c.d) and NAT64
well-known-prefix (64:ff9b::/96) forms. IPv4-compatible (::a.b.c.d), 6to4 and
Teredo are refused whole: tunnels that can lead to any IPv4 behind them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

Net = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4: list[tuple[Net, str]] = [
    (ipaddress.ip_network(n), why)
    for n, why in (
        ("0.0.0.0/8", "unspecified / this network"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking (RFC 2544)"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved (class E)"),
    )
]

_V6: list[tuple[Net, str]] = [
    (ipaddress.ip_network(n), why)
    for n, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
        ("100::/64", "discard-only (RFC 6666)"),
        ("2001::/32", "Teredo tunnel"),
        ("2001:2::/48", "benchmarking (RFC 5180)"),
        ("2001:10::/28", "ORCHID (deprecated)"),
        ("2001:20::/28", "ORCHIDv2"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4 tunnel"),
        ("3fff::/20", "documentation (RFC 9637)"),
        ("5f00::/16", "SRv6 SIDs (RFC 9602)"),
        ("fc00::/7", "unique local (ULA)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
]

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


def address_refusal(ip: str) -> str | None:
    """Why `ip` must not be dialled, or None when it is globally routable."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return f"{ip!r} is not an IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return "scoped IPv6 address"
        for net, prefix in ((_MAPPED, "IPv4-mapped"), (_TRANSLATED, "IPv4-translated"),
                            (_NAT64, "NAT64")):
            if addr in net:
                inner = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
                why = address_refusal(str(inner))
                return f"{prefix} form of {inner}: {why}" if why else None
        for net, why in _V6:
            if addr in net:
                return why
        if addr not in _GLOBAL_UNICAST:
            return "outside IPv6 global unicast 2000::/3"
    else:
        for net, why in _V4:
            if addr in net:
                return why
    if not addr.is_global:
        return "not globally routable (IANA special-purpose registry)"
    return None


def vet(infos: Iterable[Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split getaddrinfo() results into (addresses to dial, in order, deduplicated)
    and [(address, reason)] refused. Accepts 5-tuples or bare address strings."""
    allowed: list[str] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    for info in infos:
        ip = info if isinstance(info, str) else str(info[4][0])
        if ip in seen:
            continue
        seen.add(ip)
        why = address_refusal(ip)
        if why is None:
            allowed.append(ip)
        else:
            refused.append((ip, why))
    return allowed, refused
