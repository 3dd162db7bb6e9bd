"""The sandbox's DNS: allowlisted names resolve to loopback, everything else fails at once.

``answer()`` is pure (bytes in, bytes out, dnslib for the wire format: ``dnswire.py``,
imported once the command has started). ``DnsServer`` owns
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
from collections.abc import Callable, Sequence

from agentpen.core.events import make_event
from agentpen.core.record import record
from agentpen.workers.netns.errors import NetnsSetupError

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

Matcher = Callable[[str], "str | None"]

TTL = 5  # short: a changed allowlist or a restarted session never sees stale answers
EDE_OPTION = 15  # RFC 8914: the EDNS option code of an Extended DNS Error
EDE_BLOCKED = 15  # ... and its info code "Blocked"
EDE_TEXT = b"agentpen: name not in the allowlist"
MAX_NAMES_TRACKED = 10_000  # distinct refused names remembered (bounded memory)


@record(frozen=True)
class DnsDecision:
    """What happened to one datagram, for the caller's audit decision."""

    verdict: str  # "allowed" | "learned" | "refused" | "malformed" | "ignored" | "unsupported"
    name: str | None = None  # lowercase, no trailing dot
    qtype: str | None = None
    rcode: str | None = None  # of the reply sent, None when nothing is sent
    rule: str | None = None  # the allowlist entry that matched


def answer(query: bytes, matcher: Matcher, *, learn: bool) -> tuple[bytes | None, DnsDecision]:
    """Pure: the reply to one DNS query (None: send nothing) and what was decided; never
    raises (see ``dnswire.answer``, where dnslib is imported: ~10 ms that the worker pays
    after the command has started, not before, see ``DnsServer.warm``)."""
    from agentpen.workers.netns.dnswire import answer as wire_answer

    return wire_answer(query, matcher, learn=learn)


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

    def __init__(self, matcher: Matcher | None = None, *, allow: Sequence[str] = (), learn: bool = False,
                 port: int = 53, addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
                 audit: DnsAudit | None = None, budget: int = 64) -> None:
        # Without a matcher, ``warm()`` builds one from ``allow`` (the proxy's Allowlist).
        self.matcher, self.allow = matcher, tuple(allow)
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

    def configure(self, allow: Sequence[str], *, learn: bool) -> None:
        """The session's allowlist and learn mode, once the policy is known (the sockets
        were created earlier, from the doors alone)."""
        self.matcher, self.allow, self.learn = None, tuple(allow), learn

    def warm(self) -> None:
        """The matcher and the wire format, imported and built now (the netns worker calls
        this once the jail runs: neither is needed before the first query)."""
        if self.matcher is None:
            from agentpen.workers.proxy.allowlist import Allowlist

            self.matcher = Allowlist(self.allow).match
        import agentpen.workers.netns.dnswire  # noqa: F401

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
        if self.matcher is None:
            self.warm()
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
                reply, decision = answer(data, self.matcher, learn=self.learn)  # type: ignore[arg-type]
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
