"""Upstream address vetting (pure)."""

from __future__ import annotations

import socket

import pytest
from agentpen.workers.proxy.vetting import address_refusal, vet

GLOBAL = ["1.1.1.1", "8.8.8.8", "140.82.112.3", "2606:4700:4700::1111", "2a00:1450:4001::200e",
          "::ffff:1.1.1.1", "64:ff9b::808:808"]


@pytest.mark.parametrize("ip", GLOBAL)
def test_global_allowed(ip: str) -> None:
    assert address_refusal(ip) is None  # positive control for the refusals below


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
        ("192.168.1.1", "private"), ("100.64.0.1", "carrier-grade"),
        ("100.127.255.254", "carrier-grade"), ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"),
        ("192.0.2.1", "documentation"), ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"), ("198.18.0.1", "benchmark"),
        ("198.19.255.1", "benchmark"), ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"), ("192.0.0.8", "IETF"),
        ("192.88.99.1", "6to4 relay"),
        ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"),
        ("fe80::1%2", "scoped"), ("fc00::1", "unique local"), ("fd12:3456::1", "unique local"),
        ("fec0::1", "site-local"), ("ff02::1", "multicast"), ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"), ("2002:7f00:1::1", "6to4"), ("2002:808:808::1", "6to4"),
        ("2001:0:4136:e378::1", "Teredo"), ("::127.0.0.1", "IPv4-compatible"),
        ("::8.8.8.8", "IPv4-compatible"), ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1"),
        ("::ffff:10.0.0.1", "IPv4-mapped"), ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:0:127.0.0.1", "IPv4-translated"), ("64:ff9b::7f00:1", "NAT64 form"),
        ("64:ff9b::a9fe:a9fe", "link-local"), ("64:ff9b:1::1", "local-use NAT64"),
        ("100::1", "discard"), ("2001:2::1", "benchmark"), ("2001:10::1", "ORCHID"),
        ("4000::1", "outside IPv6 global unicast"), ("5f00::1", "SRv6"),
        ("localhost", "not an IP"), ("2130706433", "not an IP"), ("0x7f.1", "not an IP"),
    ],
)
def test_refused(ip: str, reason: str) -> None:
    why = address_refusal(ip)
    assert why is not None and reason in why, why


def test_vet_getaddrinfo_shape() -> None:
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("1.1.1.1", 443)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 443)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2606:4700::1111", 443, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("1.1.1.1", 443)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 443, 0, 0)),
    ]
    allowed, refused = vet(infos)
    assert allowed == ["1.1.1.1", "2606:4700::1111"]
    assert refused == [("10.0.0.1", "private (RFC 1918)"), ("::1", "loopback")]


def test_vet_real_resolver_localhost_refused() -> None:
    infos = socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)
    allowed, refused = vet(infos)
    assert allowed == [] and refused
