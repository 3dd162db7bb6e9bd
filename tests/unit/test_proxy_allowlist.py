"""Allowlist entry normalisation and matching (pure)."""

from __future__ import annotations

import hashlib
import time

import pytest
from agentpen.workers.proxy.allowlist import Allowlist, normalize_allow_entry
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("entry", "canon"),
    [
        ("api.example.com", "api.example.com"),
        ("  API.Example.COM. ", "api.example.com"),
        ("*.Example.com", "*.example.com"),
        ("*.co.uk", "*.co.uk"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c0.example.org", "a-b.c0.example.org"),
    ],
)
def test_normalise(entry: str, canon: str) -> None:
    assert normalize_allow_entry(entry) == canon


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("", "empty"),
        ("*", "everything"),
        ("*.com", "two labels"),
        ("*.", "not a valid DNS name"),
        ("a.*.com", "only a leading"),
        ("*x.example.com", "only a leading"),
        ("**.example.com", "only a leading"),
        ("127.0.0.1", "IP address"),
        ("8.8.8.8", "IP address"),
        ("2130706433", "IPv4"),
        ("0x7f.1", "IPv4"),
        ("0177.0.0.1", "IPv4"),
        ("127.1", "IPv4"),
        ("::1", "IP address"),
        ("[::1]", "IP address"),
        ("[2001:db8::1]", "IP address"),
        ("fe80::1%eth0", "IP address"),
        ("example.com:443", "ports"),
        ("foo.123", "numeric last label"),
        ("foo.0x7f", "numeric last label"),
        ("localhost", "local-only"),
        ("LOCALHOST.", "local-only"),
        ("api.localhost", "local-only"),
        ("localhost.localdomain", "local-only"),
        ("printer.local", "local-only"),
        ("router.home.arpa", "local-only"),
        ("1.0.0.127.in-addr.arpa", "local-only"),
        ("db.internal", "local-only"),
        ("x.onion", "local-only"),
        ("*.localhost", "local-only"),
        ("intranet", "single-label"),
        ("a..example.com", "empty label"),
        ("-a.example.com", "letters"),
        ("a_b.example.com", "letters"),
        ("a\x00.example.com", "control"),
        ("a" * 64 + ".com", "label longer"),
        ("xn--zz\u00e9.example", "internationalised"),
    ],
)
def test_refused(entry: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        normalize_allow_entry(entry)


def test_match_exact_and_wildcard() -> None:
    al = Allowlist(["api.example.com", "*.githubusercontent.com", "*.Deep.Example.org"])
    assert al.match("api.example.com") == "api.example.com"
    assert al.match("API.EXAMPLE.COM.") == "api.example.com"
    assert al.match("example.com") is None
    assert al.match("x.api.example.com") is None
    assert al.match("raw.githubusercontent.com") == "*.githubusercontent.com"
    assert al.match("a.b.githubusercontent.com") == "*.githubusercontent.com"
    assert al.match("githubusercontent.com") is None  # subdomains only
    assert al.match("evilgithubusercontent.com") is None
    assert al.match("githubusercontent.com.evil.com") is None
    assert al.match("x.deep.example.org") == "*.deep.example.org"
    assert al.match("") is None
    assert al.match("a..githubusercontent.com") is None


def test_invalid_entry_fails_whole_list() -> None:
    with pytest.raises(ValueError, match="localhost"):
        Allowlist(["api.example.com", "localhost"])


def test_digest_canonical() -> None:
    a = Allowlist(["B.example.com", "a.example.com", "a.example.com."])
    b = Allowlist(["a.example.com", "b.example.com"])
    assert a.digest() == b.digest()
    assert a.digest() == hashlib.sha256(b"a.example.com\nb.example.com").hexdigest()
    assert a.digest() != Allowlist(["a.example.com"]).digest()


def test_fast_for_10000_entries() -> None:
    entries = [f"h{i}.svc{i % 97}.example.com" for i in range(5000)]
    entries += [f"*.zone{i}.example.net" for i in range(5000)]
    t0 = time.perf_counter()
    al = Allowlist(entries)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(10000):
        assert al.match(f"a.b.zone{i % 5000}.example.net") == f"*.zone{i % 5000}.example.net"
        assert al.match(f"miss{i}.example.org") is None
    per_match = (time.perf_counter() - t0) / 20000
    assert len(al) == 10000
    # Generous bounds: a linear scan would take ~10,000x longer per match.
    assert build < 2.0 and per_match < 50e-6, (build, per_match)


def _reference_ip_refusal(text: str) -> str | None:
    """The IP-literal check as it was before its fast path: ipaddress on everything."""
    import ipaddress
    import socket

    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
        return "ip"
    except ValueError:
        pass
    try:
        socket.inet_aton(bare)
        return "numeric"
    except (OSError, ValueError):
        pass
    return "colon" if (":" in text or "[" in text or "]" in text) else None


def _ip_refusal(text: str) -> str | None:
    """Which refusal the current check gives, in _reference_ip_refusal's words."""
    from agentpen.workers.proxy.allowlist import _refuse_ip_literal

    try:
        _refuse_ip_literal(text)
    except ValueError as exc:
        msg = str(exc)
        return "ip" if "is an IP address" in msg else "numeric" if "numeric spelling" in msg else "colon"
    return None


@pytest.mark.parametrize("text", [
    "1.2.3.4", "[1.2.3.4]", "::1", "[::1]", "fe80::1%eth0", "[fe80::1%25eth0]", "1.2.3.4%eth0",
    "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "1.2.3", "01.02.03.04", "1.2.3.4.", "1..2.3",
    "256.1.1.1", "example.com", "cafe.be", "a1.b2", "0xcafe", "abc::", "x:443", "[]", "", ".",
    "1.2.3.4:443", "::ffff:10.0.0.1", "1e3", "\u0661.\u0662.\u0663.\u0664",  # Arabic-Indic digits
])
def test_ip_literal_fast_path_refuses_exactly_what_ipaddress_did(text: str) -> None:
    assert _ip_refusal(text) == _reference_ip_refusal(text), text


@given(st.text(alphabet="0123456789abcdefx.:%[]", max_size=20))
def test_ip_literal_fast_path_matches_ipaddress_on_random_input(text: str) -> None:
    assert _ip_refusal(text) == _reference_ip_refusal(text)
