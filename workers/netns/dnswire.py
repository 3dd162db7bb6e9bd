"""The DNS wire format for ``dns.answer``: pure, bytes in, bytes out, through dnslib.

Kept apart from dns.py so that the netns worker creates its DNS sockets (before the
command starts) without importing dnslib; ``DnsServer.warm()`` imports this module once
the jail is running (issue 10).
"""

from __future__ import annotations

from agentpen.workers.netns.dns import EDE_BLOCKED, EDE_OPTION, EDE_TEXT, TTL, DnsDecision, Matcher
from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, A, DNSError, DNSHeader, DNSRecord, EDNSOption
from dnslib.buffer import Buffer
from dnslib.buffer import BufferError as DNSBufferError
from dnslib.label import DNSLabelError

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

_ANSWERS = {QTYPE.A: (A, "127.0.0.1"), QTYPE.AAAA: (AAAA, "::1")}


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
