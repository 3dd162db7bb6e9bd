"""The in-namespace DNS responder: pure answer(), audit rate limiting, and a real UDP socket."""

from __future__ import annotations

import socket

import pytest
from agentpen.workers.netns.dns import (
    EDE_OPTION,
    TTL,
    DnsAudit,
    DnsDecision,
    DnsServer,
    RateLimiter,
    answer,
)
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st


def fake_match(host: str) -> str | None:
    """Stands in for proxy.allowlist.Allowlist(...).match: exact and *.suffix."""
    if host == "api.example.com":
        return host
    if host.endswith(".wild.example"):
        return "*.wild.example"
    return None


def ask(name: str, qtype: str = "A", *, learn: bool = False, edns: bool = False):
    q = DNSRecord.question(name, qtype)
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    raw, decision = answer(q.pack(), fake_match, learn=learn)
    assert raw is not None
    reply = DNSRecord.parse(raw)
    assert reply.header.id == q.header.id and reply.header.qr == 1
    return reply, decision


def test_allowed_name_gets_loopback_with_short_ttl():
    reply, d = ask("API.Example.COM.")
    assert d == DnsDecision("allowed", "api.example.com", "A", "NOERROR", "api.example.com")
    assert [(str(r.rdata), r.ttl) for r in reply.rr] == [("127.0.0.1", TTL)]
    reply, _ = ask("api.example.com", "AAAA")
    assert [str(r.rdata) for r in reply.rr] == ["::1"]


def test_wildcard_any_depth():
    reply, d = ask("a.b.wild.example")
    assert d.verdict == "allowed" and d.rule == "*.wild.example"
    assert str(reply.rr[0].rdata) == "127.0.0.1"


def test_unlisted_is_nxdomain_with_no_answer():
    reply, d = ask("evil.example.net")
    assert reply.header.rcode == RCODE.NXDOMAIN and not reply.rr
    assert d.verdict == "refused" and d.name == "evil.example.net"
    # the parent of a wildcard is not covered by it
    assert ask("wild.example")[1].verdict == "refused"


def test_unlisted_edns_client_gets_extended_error():
    reply, _ = ask("evil.example.net", edns=True)
    opts = [o for rr in reply.ar if rr.rtype == QTYPE.OPT for o in rr.rdata]
    assert opts and opts[0].code == EDE_OPTION and opts[0].data[:2] == b"\x00\x0f"


def test_other_types_of_allowed_names_are_nodata():
    reply, d = ask("api.example.com", "HTTPS")
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr and d.verdict == "allowed"
    reply, _ = ask("api.example.com", "ANY")
    assert sorted(str(r.rdata) for r in reply.rr) == ["127.0.0.1", "::1"]


def test_learn_mode_answers_everything():
    reply, d = ask("anything.example.org", learn=True)
    assert d.verdict == "learned" and str(reply.rr[0].rdata) == "127.0.0.1"
    assert ask("api.example.com", learn=True)[1].verdict == "allowed"


def test_malformed_and_responses():
    assert answer(b"", fake_match, learn=False)[0] is None
    assert answer(b"\x12\x34\x01", fake_match, learn=False)[0] is None
    raw, d = answer(b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\xff", fake_match, learn=False)
    assert d.verdict == "malformed" and raw is not None
    hdr = DNSRecord.parse(raw).header
    assert hdr.id == 0x1234 and hdr.rcode == RCODE.FORMERR
    response = DNSRecord.question("api.example.com").reply().pack()
    assert answer(response, fake_match, learn=False) == (None, DnsDecision("ignored"))


def test_two_questions_and_non_query_opcode():
    q = DNSRecord.question("api.example.com")
    q.add_question(*DNSRecord.question("evil.net").questions)
    raw, d = answer(q.pack(), fake_match, learn=False)
    assert d.verdict == "malformed" and DNSRecord.parse(raw).header.rcode == RCODE.FORMERR
    q = DNSRecord.question("api.example.com")
    q.header.opcode = 2
    raw, d = answer(q.pack(), fake_match, learn=False)
    assert DNSRecord.parse(raw).header.rcode == RCODE.NOTIMP and not DNSRecord.parse(raw).rr


def test_names_with_dots_or_binary_in_labels_are_refused():
    q = DNSRecord.question("x")
    q.q.qname.label = (b"api.example", b"com")  # one label holding a dot: not that name
    raw, d = answer(q.pack(), fake_match, learn=True)
    assert d.verdict == "refused" and DNSRecord.parse(raw).header.rcode == RCODE.NXDOMAIN
    q.q.qname.label = (b"api\xff", b"com")
    raw, d = answer(q.pack(), fake_match, learn=True)
    assert d.verdict in ("refused", "malformed") and not DNSRecord.parse(raw).rr


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_never_raises_and_never_answers_non_loopback(data):
    raw, _ = answer(data, fake_match, learn=True)
    if raw is not None:
        for rr in DNSRecord.parse(raw).rr:
            assert str(rr.rdata) in ("127.0.0.1", "::1")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 511), st.integers(0, 255))
def test_fuzz_flipped_bytes_of_a_valid_query(pos, value):
    q = bytearray(DNSRecord.question("api.example.com", "A").pack())
    q[pos % len(q)] = value
    answer(bytes(q), fake_match, learn=False)


# -- audit rate limiting -------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def refused(name: str) -> DnsDecision:
    return DnsDecision("refused", name, "A", "NXDOMAIN")


def test_audit_first_occurrence_then_counts():
    audit = DnsAudit(RateLimiter(rate=10, burst=10, clock=Clock()))
    ev = audit.event(refused("evil.net"))
    assert ev["action"] == "dns-refused" and ev["dns"]["question"]["name"] == "evil.net"
    assert ev["event"]["outcome"] == "success"  # ECS: the denial itself succeeded
    assert audit.event(refused("evil.net")) is None
    assert audit.repeats == 1
    assert audit.event(DnsDecision("allowed", "api.example.com", "A", "NOERROR", "x")) is None


def test_audit_rate_limit_drops_and_reports():
    clock = Clock()
    audit = DnsAudit(RateLimiter(rate=2, burst=3, clock=clock))
    out = [audit.event(refused(f"n{i}.example")) for i in range(10)]
    assert sum(e is not None for e in out) == 3 and audit.suppressed == 7
    clock.t = 1.0  # two more tokens
    ev = audit.event(refused("late.example"))
    assert ev["agentpen"]["dns"]["suppressed_before"] == 7
    assert audit.summary()["agentpen"]["dns"]["suppressed"] == 0


# -- the server on real sockets (a high port: no privilege needed) ------------------------

def test_server_answers_over_udp_v4_and_v6():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    try:
        server = DnsServer(fake_match, port=port)
    except OSError as exc:
        pytest.skip(f"port {port} raced away: {exc}")
    try:
        assert len(server.fileno_list()) == 2
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.sendto(DNSRecord.question("api.example.com").pack(), (addr, port))
                client.sendto(DNSRecord.question("evil.net").pack(), (addr, port))
                fd = next(fd for fd, s in server.socks.items() if s.family == family)
                events = server.handle_readable(fd)
                first = DNSRecord.parse(client.recv(4096))
                second = DNSRecord.parse(client.recv(4096))
                assert str(first.rr[0].rdata) in ("127.0.0.1",)
                assert second.header.rcode == RCODE.NXDOMAIN
        # the second refusal of evil.net (over v6) is a repeat, not a new event
        assert server.stats["refused"] == 2 and server.audit.repeats == 1
        assert events == []
        assert server.handle_readable(server.fileno_list()[0]) == []  # nothing waiting
    finally:
        server.close()


def test_learned_names_survive_the_rate_limit():
    audit = DnsAudit(RateLimiter(rate=1, burst=1, clock=Clock()))
    sent = [audit.event(DnsDecision("learned", f"n{i}.example", "A", "NOERROR"))
            for i in range(5)]
    assert sum(e is not None for e in sent) == 1 and sent[0]["action"] == "dns-learned"
    assert audit.summary()["agentpen"]["dns"]["learned"] == [f"n{i}.example" for i in range(5)]


def test_with_the_real_allowlist_matcher():
    allowlist = pytest.importorskip("agentpen.workers.proxy.allowlist")
    match = allowlist.Allowlist(["api.example.com", "*.wild.example"]).match
    for name, verdict in (("API.example.com.", "allowed"), ("a.b.wild.example", "allowed"),
                          ("wild.example", "refused"), ("example.com", "refused")):
        _, d = answer(DNSRecord.question(name).pack(), match, learn=False)
        assert d.verdict == verdict, name


def test_server_bind_failure_fails_closed_without_leaking():
    import os

    from agentpen.workers.netns.errors import NetnsSetupError

    taken = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    taken.bind(("::1", 0))
    before = set(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(NetnsSetupError) as exc:
            DnsServer(fake_match, port=taken.getsockname()[1])
        assert "::1" in exc.value.what
    finally:
        taken.close()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_the_dns_module_creates_sockets_without_dnslib_and_warm_loads_it():
    """The netns worker creates the DNS sockets before the command starts without paying
    for dnslib or the allowlist (issue 10); warm() builds both, and a server built from
    an allowlist answers like one given a matcher."""
    import subprocess
    import sys

    code = ("import sys; from agentpen.workers.netns.dns import DnsServer; "
            "s = DnsServer(allow=['api.example.com'], port=0, addresses=('127.0.0.1',)); "
            "a = 'dnslib' in sys.modules or 'agentpen.workers.proxy.allowlist' in sys.modules; "
            "s.warm(); b = 'dnslib' in sys.modules and s.matcher is not None; s.close(); print(a, b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "True"], out.stderr

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    try:
        server = DnsServer(allow=["api.example.com"], port=port, addresses=("127.0.0.1",))
    except OSError as exc:
        pytest.skip(f"port {port} raced away: {exc}")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(DNSRecord.question("API.example.com").pack(), ("127.0.0.1", port))
            client.sendto(DNSRecord.question("evil.net").pack(), ("127.0.0.1", port))
            server.handle_readable(server.fileno_list()[0])  # not warmed: warms itself
            assert str(DNSRecord.parse(client.recv(4096)).rr[0].rdata) == "127.0.0.1"
            assert DNSRecord.parse(client.recv(4096)).header.rcode == RCODE.NXDOMAIN
    finally:
        server.close()
