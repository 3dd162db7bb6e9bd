"""Property tests (hypothesis) of the egress policy: allowlist entries and matching, upstream
address vetting, --upstream pins, and the sandbox's DNS answers. Bounded for CI
(max_examples per test below, no deadline); the atheris harness tests/fuzz/fuzz_policy.py
runs the same oracles for long runs (docs/security.md).

Each property compares the code with an independent statement of the rule, so a test
fails on a wrong answer, not only on a crash."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from agentpen.supervisor.errors import UsageError
from agentpen.supervisor.resolve import parse_upstream
from agentpen.workers.netns.dns import answer
from agentpen.workers.proxy.allowlist import Allowlist, normalize_allow_entry
from agentpen.workers.proxy.names import canonical_host
from agentpen.workers.proxy.vetting import address_refusal, vet
from dnslib import QTYPE, DNSRecord
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

CI = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LABELS = st.sampled_from(["a", "b", "api", "example", "com", "net", "xn--bcher-kva", "a-b", "x1"])
NAME = st.lists(LABELS, min_size=2, max_size=5).map(".".join)
NASTY = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
TRICKY = st.text(alphabet="aAbB.-*_:[]%\\ \x00\x1b\n0123456789xX", max_size=40)
LOCAL = ("localhost", "localdomain", "local", "home.arpa", "internal", "invalid", "onion", "arpa")


def _is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]").split("%")[0])
        return True
    except ValueError:
        pass
    try:
        socket.inet_aton(text)
        return True
    except (OSError, ValueError):
        return False


# -- allowlist entries ----------------------------------------------------------------

@CI
@given(st.one_of(NASTY, TRICKY, NAME, NAME.map(lambda n: "*." + n)))
def test_entry_is_refused_or_canonical_and_idempotent(entry: str) -> None:
    try:
        canon = normalize_allow_entry(entry)
    except ValueError:
        return  # refused, with a reason (any other exception type fails the test)
    assert normalize_allow_entry(canon) == canon  # idempotent
    host = canon[2:] if canon.startswith("*.") else canon
    assert host == canonical_host(host)  # lowercase LDH, no trailing dot
    assert "*" not in host and host.count(".") >= 1
    assert not _is_ip_literal(host)
    assert not any(host == s or host.endswith("." + s) for s in LOCAL)


@CI
@given(NAME, st.booleans(), st.booleans())
def test_case_and_one_trailing_dot_do_not_change_the_entry(name: str, upper: bool, dot: bool) -> None:
    assume(not any(name == s or name.endswith("." + s) for s in LOCAL))
    variant = (name.upper() if upper else name) + ("." if dot else "")
    assert normalize_allow_entry(variant) == normalize_allow_entry(name) == name


# -- matching against a reference implementation ----------------------------------------

def _reference(entries: list[str], host: str) -> bool:
    """The rule in words: exact name, or a proper subdomain of a `*.suffix`; compared
    case-insensitively, with one trailing dot ignored; only valid LDH names."""
    try:
        h = canonical_host(host)
    except ValueError:
        return False
    for e in entries:
        if e.startswith("*."):
            if h.endswith("." + e[2:]):
                return True
        elif h == e:
            return True
    return False


ENTRY = st.one_of(NAME, NAME.map(lambda n: "*." + n))


@CI
@given(st.lists(ENTRY, min_size=1, max_size=6), st.one_of(NAME, TRICKY, NAME.map(str.upper),
                                                          NAME.map(lambda n: n + "."),
                                                          NAME.map(lambda n: n + "..")))
def test_match_agrees_with_the_reference(entries: list[str], host: str) -> None:
    al = Allowlist(entries)
    canon = list(al.entries)
    got = al.match(host)
    assert (got is not None) == _reference(canon, host), (canon, host, got)
    if got is not None:
        assert got in canon
        h = canonical_host(host)
        assert h == got if not got.startswith("*.") else (h.endswith(got[1:]) and h != got[2:])


@CI
@given(st.lists(ENTRY, min_size=1, max_size=6), NAME, st.sampled_from(["\x00", "\x1b", " ", "_", "%",
                                                                       "\\", "\n", "..", "\u0430"]))
def test_a_name_with_a_foreign_character_never_matches(entries: list[str], host: str, bad: str) -> None:
    al = Allowlist(entries)
    for pos in (0, len(host) // 2, len(host)):
        assert al.match(host[:pos] + bad + host[pos:]) is None


@CI
@given(st.lists(ENTRY, min_size=1, max_size=6), NAME)
def test_a_wildcard_never_matches_its_own_apex(entries: list[str], name: str) -> None:
    al = Allowlist(["*." + name])
    assert al.match(name) is None
    assert al.match("x." + name) == "*." + name


# -- upstream address vetting ------------------------------------------------------------

V4 = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
V6 = st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))
SPECIAL_V4 = st.sampled_from(["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.0.1", "169.254.169.254",
                              "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "192.0.2.1"])


def _embedded_v4(ip: str) -> str | None:
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv6Address):
        for net in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"):
            if a in ipaddress.ip_network(net):
                return str(ipaddress.IPv4Address(int(a) & 0xFFFFFFFF))
    return None


@CI
@given(st.one_of(V4, V6, SPECIAL_V4))
def test_a_dialable_address_is_global_unicast(ip: str) -> None:
    why = address_refusal(ip)
    a = ipaddress.ip_address(ip)
    inner = _embedded_v4(ip)
    if why is None:
        target = ipaddress.ip_address(inner) if inner else a
        assert target.is_global and not target.is_multicast and not target.is_loopback
        assert not target.is_private and not target.is_link_local and not target.is_reserved
        if isinstance(a, ipaddress.IPv6Address) and inner is None:
            assert a in ipaddress.ip_network("2000::/3")
    if a.is_loopback or a.is_private or a.is_link_local or a.is_multicast or a.is_unspecified:
        assert why is not None, ip


@CI
@given(st.one_of(V4, SPECIAL_V4))
def test_every_ipv6_spelling_of_an_ipv4_gets_the_ipv4_verdict(v4: str) -> None:
    base = address_refusal(v4) is None
    n = int(ipaddress.IPv4Address(v4))
    for form in (f"::ffff:{v4}", str(ipaddress.IPv6Address((0xFFFF << 32) | n)),
                 str(ipaddress.IPv6Address((0xFFFF << 48) | n)), f"64:ff9b::{v4}"):
        assert (address_refusal(form) is None) == base, form
    assert address_refusal(f"::{v4}") is not None  # IPv4-compatible: refused whole
    assert address_refusal(f"2002:{n >> 16:x}:{n & 0xFFFF:x}::1") is not None  # 6to4


@CI
@given(st.lists(st.one_of(V4, V6, SPECIAL_V4, NASTY), max_size=12))
def test_vet_partitions_its_input(ips: list[str]) -> None:
    allowed, refused = vet(ips)
    assert len(set(allowed)) == len(allowed)
    assert set(allowed) | {ip for ip, _ in refused} == set(ips)
    assert not set(allowed) & {ip for ip, _ in refused}
    assert all(address_refusal(ip) is None for ip in allowed)
    assert allowed == [ip for ip in dict.fromkeys(ips) if address_refusal(ip) is None]  # order kept


# -- --upstream pins ------------------------------------------------------------------------

@CI
@given(st.one_of(NASTY, TRICKY, st.builds(lambda h, a, p: f"{h}={a}:{p}", NAME, st.one_of(V4, V6, NASTY),
                                          st.integers(-5, 70000))))
def test_upstream_pin_is_parsed_or_refused_with_a_usage_error(spec: str) -> None:
    try:
        host, addr, port = parse_upstream(spec)
    except UsageError:
        return
    ipaddress.ip_address(addr)  # an IP literal, never a name to resolve
    assert 1 <= port <= 65535
    assert host and "=" not in host


# -- the sandbox's DNS answers ------------------------------------------------------------------

@CI
@given(st.lists(ENTRY, min_size=1, max_size=4), st.one_of(NAME, TRICKY.filter(bool)),
       st.sampled_from(["A", "AAAA", "TXT", "MX", "ANY", "CNAME", "HTTPS"]))
def test_dns_answers_loopback_for_allowed_names_only(entries: list[str], name: str, qtype: str) -> None:
    al = Allowlist(entries)
    try:
        query = DNSRecord.question(name, qtype).pack()
    except Exception:  # dnslib refuses to build it: nothing to send
        return
    reply, decision = answer(query, al.match, learn=False)
    assert reply is not None
    rec = DNSRecord.parse(reply)
    addrs = {str(rr.rdata) for rr in rec.rr}
    assert addrs <= {"127.0.0.1", "::1"}, addrs
    if al.match(name) is None:
        assert rec.header.rcode == 3 and not rec.rr, (name, decision)  # NXDOMAIN, no answer
    else:
        assert rec.header.rcode == 0
        assert bool(rec.rr) == (qtype in ("A", "AAAA", "ANY")), (qtype, rec.rr)
        assert all(QTYPE[rr.rtype] in (qtype, "A", "AAAA") if qtype == "ANY" else QTYPE[rr.rtype] == qtype
                   for rr in rec.rr)


@CI
@given(st.binary(max_size=600))
def test_dns_random_datagrams_never_get_an_address(data: bytes) -> None:
    al = Allowlist(["api.example.com"])
    reply, _decision = answer(data, al.match, learn=False)
    if reply is None:
        return
    rec = DNSRecord.parse(reply)
    for rr in rec.rr:  # an answer can only be loopback, and only for the allowed name
        assert str(rr.rdata) in ("127.0.0.1", "::1")
        assert str(rr.rname).rstrip(".").lower() == "api.example.com"


def test_dns_regression_unpackable_question() -> None:
    """fuzz_policy.py found it: dnslib parses a 64-byte label but cannot pack the reply;
    answer() raised, and one datagram from the sandbox took the netns worker down."""
    al = Allowlist(["api.example.com"])
    query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40" + b"a" * 64
             + b"\x03com\x00\x00\x01\x00\x01")
    reply, decision = answer(query, al.match, learn=False)
    assert decision.verdict == "malformed" and reply is not None
    rec = DNSRecord.parse(reply)
    assert rec.header.rcode == 1 and not rec.rr  # FORMERR, header only


def test_dns_regression_compression_pointer_loop() -> None:
    """fuzz_policy.py found it: a question name made of compression pointers that loop made
    dnslib recurse to the limit (RecursionError, ~3 ms a datagram)."""
    al = Allowlist(["api.example.com"])
    for query in (bytes.fromhex("c00107c00030000000d72f2dc000"),
                  bytes.fromhex("123401000001000000000000c00c00010001")):
        reply, decision = answer(query, al.match, learn=False)
        assert decision.verdict == "malformed", decision
    # control: an uncompressed question for the allowed name is still answered
    reply, decision = answer(DNSRecord.question("api.example.com", "A").pack(), al.match, learn=False)
    assert decision.verdict == "allowed" and reply is not None


@pytest.mark.parametrize("entry", ["*.com", "*", "localhost", "127.0.0.1", "0x7f.1", "vm", "runsc"])
def test_control_refusals_still_refuse(entry: str) -> None:
    """Positive control for the properties above: the oracle functions see real refusals."""
    with pytest.raises(ValueError):
        normalize_allow_entry(entry)
