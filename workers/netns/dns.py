"""The sandbox's DNS: allowlisted names resolve to loopback, everything else fails at once.

``answer()`` is pure (bytes in, bytes out, dnslib for the wire format). ``DnsServer`` owns
the UDP sockets on 127.0.0.1:53 and [::1]:53 inside the namespace and feeds them to it.
No query is ever forwarded: there is no upstream resolver and no route to one.

Refused names get NXDOMAIN, not REFUSED: glibc treats REFUSED as "ask the next server"
and ends with EAI_AGAIN ("temporary failure"), which npm, pip and others retry with
back-off; NXDOMAIN ends getaddrinfo at once with EAI_NONAME. EDNS clients also get an
Extended DNS Error (RFC 8914, code 15 "Blocked") saying why.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agentpen.core.events import make_event
from agentpen.workers.netns.errors import NetnsSetupError
from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, A, DNSError, DNSHeader, DNSRecord, EDNSOption
from dnslib.buffer import Buffer
from dnslib.buffer import BufferError as DNSBufferError
from dnslib.label import DNSLabelError

Matcher = Callable[[str], "str | None"]

TTL = 5  # short: a changed allowlist or a restarted session never sees stale answers
EDE_OPTION = 15  # RFC 8914: the EDNS option code of an Extended DNS Error
EDE_BLOCKED = 15  # ... and its info code "Blocked"
EDE_TEXT = b"agentpen: name not in the allowlist"
_ANSWERS = {QTYPE.A: (A, "127.0.0.1"), QTYPE.AAAA: (AAAA, "::1")}
MAX_NAMES_TRACKED = 10_000  # distinct refused names remembered (bounded memory)


@dataclass(frozen=True)
class DnsDecision:
    """What happened to one datagram, for the caller's audit decision."""

    verdict: str  # "allowed" | "learned" | "refused" | "malformed" | "ignored" | "unsupported"
    name: str | None = None  # lowercase, no trailing dot
    qtype: str | None = None
    rcode: str | None = None  # of the reply sent, None when nothing is sent
    rule: str | None = None  # the allowlist entry that matched


def _name_of(qname: Any) -> str | None:
    """The queried name as the allowlist sees it, or None if it is no hostname at all."""
    labels = getattr(qname, "label", None)
    if labels is None:
        return None
    parts = []
    for label in labels:
        if not label or len(label) > 63 or not label.isascii() or b"." in label:
            return None
        parts.append(label.decode("ascii").lower())
    name = ".".join(parts)
    return name if name and len(name) <= 253 else None


def _formerr(query: bytes) -> bytes | None:
    if len(query) < 12:  # not even a header: nobody to answer
        return None
    qid = int.from_bytes(query[:2], "big")
    if query[2] & 0x80:  # a response: never answer those (no reflection loops)
        return None
    rd = (query[2] & 0x01) == 1
    buf = Buffer()
    DNSHeader(id=qid, qr=1, rd=int(rd), ra=1, rcode=RCODE.FORMERR).pack(buf)  # no question
    return bytes(buf.data)


# DNSLabelError and dnslib's BufferError are not DNSError subclasses; dnslib follows
# compression pointers recursively, so a pointer loop is a RecursionError.
_PARSE_ERRORS = (DNSError, DNSLabelError, DNSBufferError, ValueError, IndexError, UnicodeError,
                 TypeError, RecursionError)


def _compressed_question(query: bytes) -> bool:
    """Does the first question's name use a compression pointer (or run off the end)?
    Stub resolvers never compress the question; a pointer there can only loop or point
    forward, and dnslib would chase a loop to the recursion limit (~3 ms a datagram,
    found by tests/fuzz/fuzz_policy.py). Refused before dnslib sees it."""
    pos = 12
    while pos < len(query):
        n = query[pos]
        if n == 0:
            return False
        if n & 0xC0:
            return True
        pos += 1 + n
    return True  # no terminating root label


def answer(query: bytes, matcher: Matcher, *, learn: bool) -> tuple[bytes | None, DnsDecision]:
    """Pure: the reply to one DNS query (None: send nothing) and what was decided.

    Never raises on any input: dnslib parses some questions it cannot pack again (a label
    over 63 bytes: found by tests/fuzz/fuzz_policy.py), and an exception here would take the
    netns worker, and with it the session, down. Those get a header-only FORMERR."""
    try:
        return _answer(query, matcher, learn=learn)
    except _PARSE_ERRORS:
        reply = _formerr(query)
        return reply, DnsDecision("malformed", rcode="FORMERR" if reply else None)


def _answer(query: bytes, matcher: Matcher, *, learn: bool) -> tuple[bytes | None, DnsDecision]:
    if len(query) > 12 and query[4:6] != b"\0\0" and _compressed_question(query):
        raise DNSError("compressed or unterminated question name")
    req = DNSRecord.parse(query)
    if req.header.qr:
        return None, DnsDecision("ignored")
    reply = req.reply()  # same id, rd copied, qr=1, ra=1
    reply.rr, reply.auth, reply.ar = [], [], []
    if req.header.opcode != 0:  # only QUERY
        reply.header.rcode = RCODE.NOTIMP
        return bytes(reply.pack()), DnsDecision("unsupported", rcode="NOTIMP")
    if len(req.questions) != 1:
        reply.header.rcode = RCODE.FORMERR
        return bytes(reply.pack()), DnsDecision("malformed", rcode="FORMERR")
    q = req.questions[0]
    qtype = QTYPE.get(q.qtype, str(q.qtype))
    name = _name_of(q.qname)
    if name is None:
        reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack()), DnsDecision("refused", None, qtype, "NXDOMAIN")
    if q.qclass != 1:  # only IN
        reply.header.rcode = RCODE.REFUSED
        return bytes(reply.pack()), DnsDecision("unsupported", name, qtype, "REFUSED")
    rule = matcher(name)
    if rule is None and not learn:
        reply.header.rcode = RCODE.NXDOMAIN
        if any(rr.rtype == QTYPE.OPT for rr in req.ar):  # EDNS client: say why
            ede = EDE_BLOCKED.to_bytes(2, "big") + EDE_TEXT
            reply.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(EDE_OPTION, ede)]))
        return bytes(reply.pack()), DnsDecision("refused", name, qtype, "NXDOMAIN")
    wanted = [QTYPE.A, QTYPE.AAAA] if q.qtype == QTYPE.ANY else [q.qtype]
    for t in wanted:
        if t in _ANSWERS:
            cls, addr = _ANSWERS[t]
            reply.add_answer(RR(q.qname, t, rdata=cls(addr), ttl=TTL))
    # Other types (MX, TXT, HTTPS...) get NOERROR with no answer: the name exists, only
    # its loopback addresses do.
    verdict = "allowed" if rule is not None else "learned"
    return bytes(reply.pack()), DnsDecision(verdict, name, qtype, "NOERROR", rule)


class RateLimiter:
    """Token bucket: at most ``rate`` events a second, bursts of ``burst``."""

    def __init__(self, rate: float = 20.0, burst: int = 40,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class DnsAudit:
    """Which DNS decisions become audit events (pure apart from the injected clock).

    Refused (and, in learn mode, learned) names: the first occurrence of each name is an
    event, as long as the token bucket allows; repeats are counted, not sent. When the
    bucket is empty, or more than ``MAX_NAMES_TRACKED`` names were seen, events are
    dropped and counted; the next event that goes out (and ``summary()``) carries the
    counts of what was dropped. Allowed names make no event: the proxy audits their use.
    Learned names are also kept in ``learned`` whatever the rate limit (up to the cap), so
    ``summary()`` lists every name learn mode saw.
    """

    def __init__(self, limiter: RateLimiter | None = None) -> None:
        self.limiter = limiter or RateLimiter()
        self.seen: dict[str, int] = {}
        self.suppressed = 0  # events dropped by the rate limit or the name cap
        self.repeats = 0  # lookups of names already reported
        self.learned: dict[str, None] = {}  # ordered set of every learned name

    def event(self, decision: DnsDecision) -> dict[str, Any] | None:
        if decision.verdict not in ("refused", "learned"):
            return None
        key = decision.name or "<not a hostname>"
        if decision.verdict == "learned" and len(self.learned) < MAX_NAMES_TRACKED:
            self.learned[key] = None
        if key in self.seen:
            self.seen[key] += 1
            self.repeats += 1
            return None
        if len(self.seen) >= MAX_NAMES_TRACKED or not self.limiter.allow():
            self.suppressed += 1
            return None
        self.seen[key] = 1
        dropped, self.suppressed = self.suppressed, 0
        dns = {"question": {"name": key, "type": decision.qtype},
               "response_code": decision.rcode}
        extra = {"dns": {"suppressed_before": dropped}} if dropped else None
        if decision.verdict == "refused":
            return make_event(
                "dns-refused", f"DNS lookup of {key} refused: not in the allowlist",
                level="warning", category=["network"], type=["denied"], outcome="success",
                reason="name not in the allowlist", dns=dns, agentpen=extra,
            )
        return make_event(
            "dns-learned", f"learn mode: {key} looked up, answered with loopback",
            category=["network"], type=["allowed"], outcome="success",
            reason="learn mode answers every name", dns=dns, agentpen=extra,
        )

    def summary(self) -> dict[str, Any]:
        return make_event(
            "dns-summary",
            f"DNS: {len(self.seen)} distinct names refused or learned, {self.repeats} repeat "
            f"lookups not reported, {self.suppressed} events dropped by the rate limit",
            category=["network"], type=["info"],
            agentpen={"dns": {"names": len(self.seen), "repeats": self.repeats,
                              "suppressed": self.suppressed,
                              **({"learned": list(self.learned)} if self.learned else {})}},
        )


class DnsServer:
    """UDP DNS on the namespace's loopback. Create it while still privileged (port 53
    needs CAP_NET_BIND_SERVICE in the user namespace); serve it after the drop."""

    def __init__(self, matcher: Matcher, *, learn: bool = False, port: int = 53,
                 addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
                 audit: DnsAudit | None = None, budget: int = 64) -> None:
        self.matcher = matcher
        self.learn = learn
        self.audit = audit or DnsAudit()
        self.budget = budget  # datagrams per handle_readable call: fair to other fds
        self.stats = {"queries": 0, "allowed": 0, "learned": 0, "refused": 0,
                      "malformed": 0, "send_failed": 0, "errors": 0}
        self.socks: dict[int, socket.socket] = {}
        try:
            for addr in addresses:
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                self.socks[sock.fileno()] = sock  # before bind: closed if bind fails
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr, port))
                sock.setblocking(False)
        except OSError as exc:
            self.close()
            raise NetnsSetupError(
                f"could not bind the DNS responder on {addr} port {port}: {exc}",
                "ports below 1024 need CAP_NET_BIND_SERVICE: create it in the namespace "
                "pasta made, before dropping capabilities; the port must be free",
            ) from exc

    def fileno_list(self) -> list[int]:
        return list(self.socks)

    filenos = fileno_list

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()

    def handle_readable(self, fd: int) -> list[dict[str, Any]]:
        """Answer what is waiting on ``fd``; return the audit event bodies to send."""
        sock = self.socks[fd]
        events: list[dict[str, Any]] = []
        for _ in range(self.budget):
            try:
                data, peer = sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP error queued from an earlier send: skip it
                continue
            self.stats["queries"] += 1
            try:
                reply, decision = answer(data, self.matcher, learn=self.learn)
            except Exception:  # a bug must not stop the resolver: no answer (closed), counted
                self.stats["errors"] += 1
                continue
            if decision.verdict in self.stats:
                self.stats[decision.verdict] += 1
            if reply is not None:
                try:
                    sock.sendto(reply, peer)
                except OSError:
                    self.stats["send_failed"] += 1
            body = self.audit.event(decision)
            if body is not None:
                events.append(body)
        return events
