"""atheris harness for the egress policy (docs/security.md, "Fuzzing"): allowlist entries
and matching, upstream address vetting, --upstream pins and the sandbox's DNS answers.

Oracles checked on every input (any other exception, or an AssertionError, is a finding):
- normalize_allow_entry: ValueError or a canonical, idempotent, non-IP, non-local name;
- Allowlist.match agrees with a reference statement of the rule;
- address_refusal: None only for global unicast (embedded IPv4 judged as IPv4);
- parse_upstream: UsageError or (host, IP literal, 1..65535);
- dns.answer: never raises; answers only loopback, only for an allowed name.

    /opt/apvenv/bin/python tests/fuzz/fuzz_policy.py -max_total_time=300 corpus/
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import atheris

with atheris.instrument_imports():
    from agentpen.supervisor.errors import UsageError
    from agentpen.supervisor.resolve import parse_upstream
    from agentpen.workers.netns.dns import answer
    from agentpen.workers.proxy.allowlist import Allowlist, normalize_allow_entry
    from agentpen.workers.proxy.names import canonical_host
    from agentpen.workers.proxy.vetting import address_refusal
    from dnslib import DNSRecord

LOCAL = ("localhost", "localdomain", "local", "home.arpa", "internal", "invalid", "onion", "arpa")
ALLOWED = Allowlist(["api.example.com", "*.cdn.example.net"])


def _ip_literal(text: str) -> bool:
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


def _reference(entries: tuple[str, ...], host: str) -> bool:
    try:
        h = canonical_host(host)
    except ValueError:
        return False
    return any(h.endswith("." + e[2:]) if e.startswith("*.") else h == e for e in entries)


def check_entry(entry: str, host: str) -> None:
    try:
        canon = normalize_allow_entry(entry)
    except ValueError:
        return
    assert normalize_allow_entry(canon) == canon, (entry, canon)
    bare = canon[2:] if canon.startswith("*.") else canon
    assert bare == canonical_host(bare) and "." in bare and not _ip_literal(bare), canon
    assert not any(bare == s or bare.endswith("." + s) for s in LOCAL), canon
    al = Allowlist([canon, "api.example.com"])
    got = al.match(host)
    assert (got is not None) == _reference(al.entries, host), (al.entries, host, got)


def check_address(raw: bytes) -> None:
    ip = str(ipaddress.IPv6Address(raw[:16].ljust(16, b"\0"))) if len(raw) > 4 else \
        str(ipaddress.IPv4Address(raw.ljust(4, b"\0")))
    why = address_refusal(ip)
    a = ipaddress.ip_address(ip)
    if why is None:
        inner = None
        if isinstance(a, ipaddress.IPv6Address):
            for net in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"):
                if a in ipaddress.ip_network(net):
                    inner = ipaddress.IPv4Address(int(a) & 0xFFFFFFFF)
        t = inner or a
        assert t.is_global and not (t.is_private or t.is_loopback or t.is_link_local or t.is_multicast), ip


def check_upstream(spec: str) -> None:
    try:
        host, addr, port = parse_upstream(spec)
    except UsageError:
        return
    ipaddress.ip_address(addr)
    assert 1 <= port <= 65535 and host, spec


def check_dns(data: bytes) -> None:
    reply, _ = answer(data, ALLOWED.match, learn=False)
    if reply is None:
        return
    rec = DNSRecord.parse(reply)
    for rr in rec.rr:
        assert str(rr.rdata) in ("127.0.0.1", "::1"), rec
        assert ALLOWED.match(str(rr.rname)) is not None, rec


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    what = fdp.ConsumeIntInRange(0, 3)
    if what == 0:
        check_entry(fdp.ConsumeUnicodeNoSurrogates(64), fdp.ConsumeUnicodeNoSurrogates(64))
    elif what == 1:
        check_address(fdp.ConsumeBytes(16))
    elif what == 2:
        check_upstream(fdp.ConsumeUnicodeNoSurrogates(80))
    else:
        check_dns(fdp.ConsumeBytes(fdp.remaining_bytes()))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
