"""The proxy worker: SNI-gated TLS passthrough on uvloop (docs/proxy.md).

Runs in a child the supervisor forks. It accepts on listening sockets that live in
the sandbox's network namespace (passed in by fd, never bound here), judges each
connection by the SNI of its ClientHello, has the decision recorded by the
supervisor (event + ACK) before any byte leaves, then dials a vetted address from
the host namespace and splices bytes verbatim both ways.

Fail closed everywhere: no ACK, a congested channel, deny-new, an unresolvable or
non-public upstream, a malformed hello -> the connection is closed, never passed.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import itertools
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvloop  # imported here so a supervisor that imports this module forks warm workers
from agentpen.core import osutil
from agentpen.core.channel import PROTOCOL_VERSION, Channel, Message, MsgType, ProtocolError, encode
from agentpen.core.confine import confine
from agentpen.core.events import make_event
from agentpen.core.policy import SessionPolicy
from agentpen.workers.proxy.allowlist import Allowlist
from agentpen.workers.proxy.clienthello import ClientHello, ClientHelloError, ClientHelloParser
from agentpen.workers.proxy.names import canonical_host
from agentpen.workers.proxy.vetting import vet

Resolver = Callable[..., Awaitable[list[Any]]]

# TLS alert access_denied (49), sent to a blocked client so the agent sees a clear
# "tlsv1 alert access denied" rather than a bare reset.
ALERT_ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"


@dataclass(frozen=True)
class Limits:
    """Mechanism knobs (not policy): tests shrink them, the supervisor keeps defaults."""

    hello_timeout: float = 10.0  # to complete the ClientHello, then block
    ack_timeout: float = 10.0  # for the supervisor to record a decision
    resolve_timeout: float = 10.0
    connect_timeout: float = 10.0  # per upstream address
    idle_timeout: float = 900.0  # no byte either way (agents keep long SSE streams open)
    max_lifetime: float = 6 * 3600.0
    max_connections: int = 4096  # concurrent, per session (one worker serves one session)
    write_high: int = 256 * 1024  # per direction: pause the reader above this
    max_outbox: int = 4096  # channel messages queued while the supervisor is slow
    verdict_grace: float = 1.0  # at shutdown, for accepted connections to be judged
    upstream_port: int = 443
    listen_backlog: int = 65535  # uvloop re-listen()s; the kernel clamps to somaxconn


def proxy_main(channel_fd: int, listen_fds: list[int], policy_json: dict, incarnation: int, *,
               limits: Limits | None = None, parent_pid: int | None = None,
               resolver: Resolver | None = None, debug_ops: bool = False) -> None:
    """Entry point of a forked proxy worker; returns when the channel closes or on shutdown.

    `resolver` (tests only) replaces loop.getaddrinfo; `debug_ops` enables the
    CONTROL op "probe-exec" used by the confinement test.
    """
    osutil.close_fds_except([channel_fd, *listen_fds])
    osutil.set_pdeathsig(signal.SIGKILL, expected_parent=parent_pid)
    # Ctrl-C reaches the whole foreground group; the supervisor decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    channel = Channel.from_fd(channel_fd)
    try:
        policy = SessionPolicy.from_json(policy_json)
        allowlist = Allowlist(policy.allow)
        socks = [socket.socket(fileno=fd) for fd in listen_fds]
        for sock in socks:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ValueError(f"fd {sock.fileno()} is not a listening socket")
        if not socks:
            raise ValueError("no listening socket to serve")
        denied = confine()
        proxy = Proxy(channel, socks, policy, allowlist, incarnation,
                      fit_fd_limit(limits or Limits()), resolver=resolver, debug_ops=debug_ops,
                      seccomp_denied=denied)
    except Exception as exc:  # fail closed: report and exit without serving
        with contextlib.suppress(OSError):
            channel.send(MsgType.STATUS, {"state": "failed", "role": "proxy",
                                          "incarnation": incarnation, "error": str(exc)})
        raise SystemExit(2) from exc
    uvloop.run(proxy.serve())


def fit_fd_limit(limits: Limits) -> Limits:
    """Each connection holds two descriptors: raise RLIMIT_NOFILE toward what the cap
    needs (up to the hard limit), and lower the cap if the hard limit is smaller, so the
    cap -- audited -- is hit before accept() fails with EMFILE."""
    import resource

    need = 2 * limits.max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        return dataclasses.replace(limits, max_connections=max(1, (soft - 64) // 2))
    return limits


class Proxy:
    def __init__(self, channel: Channel, listeners: list[socket.socket], policy: SessionPolicy,
                 allowlist: Allowlist, incarnation: int, limits: Limits, *,
                 resolver: Resolver | None = None, debug_ops: bool = False,
                 seccomp_denied: list[str] | None = None) -> None:
        self.channel = channel
        self.listeners = listeners
        self.policy = policy
        self.allowlist = allowlist
        self.incarnation = incarnation
        self.limits = limits
        self.learn = policy.learn
        self.pins = {canonical_host(u.host): u for u in policy.upstreams}
        self.pin_targets = _pin_targets(self.pins)  # parsed once, not per connection
        self._resolver = resolver
        self.debug_ops = debug_ops
        self.seccomp_denied = seccomp_denied or []
        self.conns: set[Connection] = set()
        self.deny_new = False
        self.refused_while_denied = 0
        self.dropped_events = 0
        self._ids = itertools.count(1)
        self._acks = itertools.count(1)
        self._pending: dict[int, asyncio.Future[bool]] = {}
        self._outbox: collections.deque[tuple[bytes, list[int], int | None]] = collections.deque()
        self._writing = False
        self._servers: list[asyncio.AbstractServer] = []
        self._done: asyncio.Future[None] | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._done = self.loop.create_future()
        self.channel.sock.setblocking(False)
        self.loop.add_reader(self.channel.fileno(), self._on_channel)
        self.send(MsgType.HELLO, {"role": "proxy", "pid": os.getpid(),
                                  "version": PROTOCOL_VERSION, "incarnation": self.incarnation})
        for sock in self.listeners:
            self._servers.append(await self.loop.create_server(
                lambda: Connection(self), sock=sock, backlog=self.limits.listen_backlog))
        self.send(MsgType.STATUS, {
            "state": "ready", "role": "proxy", "incarnation": self.incarnation,
            "listeners": len(self.listeners), "allowlist_digest": self.allowlist.digest(),
            "allowlist_entries": len(self.allowlist), "learn": self.learn,
            "max_connections": self.limits.max_connections,
            "seccomp_denied": self.seccomp_denied,
        })
        try:
            await self._done
        finally:
            for srv in self._servers:
                srv.close()  # our copies only: the supervisor's keep the backlog alive
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.channel.fileno())

    async def _stop(self, *, audit: bool) -> None:
        if audit:
            await self._accept_backlog()
        for srv in self._servers:
            srv.close()
        if audit:
            # The supervisor asks once the sandbox is gone, so a hello still unjudged is
            # already in its socket buffer (or its EOF is): let each connection reach its
            # verdict, recorded, before anything is aborted. Bounded: a client that never
            # sent a byte must not hold the teardown.
            deadline = self.loop.time() + self.limits.verdict_grace
            while any(c.undecided for c in self.conns) and self.loop.time() < deadline:
                await asyncio.sleep(0.005)
        for conn in list(self.conns):
            conn.abort("worker shutdown" if audit else "supervisor gone")
        if audit:  # give the summaries a bounded chance to reach the supervisor
            await asyncio.sleep(0)  # let connection_lost callbacks queue their summaries
            deadline = self.loop.time() + 1.0
            while self._outbox and self.loop.time() < deadline:
                await asyncio.sleep(0.01)
        if self._done and not self._done.done():
            self._done.set_result(None)

    async def _accept_backlog(self) -> None:
        """Connections the sandbox made that still wait in the listen backlog are accepted
        now, so that each one is judged and recorded like any other (closing our copy of
        the listener would leave them to the supervisor's, unanswered). Bounded."""
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.setblocking(False)
            for _ in range(self.limits.max_connections):
                try:
                    conn, _addr = sock.accept()
                except OSError:  # BlockingIOError: the backlog is empty
                    break
                conn.setblocking(False)
                try:
                    await self.loop.connect_accepted_socket(lambda: Connection(self), conn)
                except OSError:
                    conn.close()

    # -- channel ----------------------------------------------------------------------

    def send(self, mtype: MsgType, body: dict[str, Any]) -> bool:
        """Queue one message; never blocks. False when the outbox is full (dropped)."""
        if len(self._outbox) >= self.limits.max_outbox:
            return False
        packet, fds, blob = encode(mtype, body)
        self._outbox.append((packet, fds, blob))
        if not self._writing:
            self._flush()
        return True

    def _flush(self) -> None:
        while self._outbox:
            packet, fds, blob = self._outbox[0]
            try:
                anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                       if fds else [])
                self.channel.sock.sendmsg([packet], anc)
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.channel.fileno(), self._flush)
                return
            except OSError:  # supervisor gone: nothing can be audited any more
                self._outbox.clear()
                self.loop.create_task(self._stop(audit=False))
                return
            self._outbox.popleft()
            if blob is not None:
                os.close(blob)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.channel.fileno())

    def event(self, body: dict[str, Any]) -> None:
        if self.dropped_events and len(self._outbox) < self.limits.max_outbox // 2:
            n, self.dropped_events = self.dropped_events, 0
            self.send(MsgType.EVENT, make_event(
                "events-dropped", f"{n} proxy events dropped: audit channel congested",
                level="error", category=["network"], type=["info"], agentpen={"dropped": n}))
        if not self.send(MsgType.EVENT, body):
            self.dropped_events += 1

    def decision(self, body: dict[str, Any]) -> asyncio.Future[bool]:
        """Send an event that must be recorded before we act on it; resolves to the ACK."""
        fut: asyncio.Future[bool] = self.loop.create_future()
        ack_id = next(self._acks)
        body["ack_id"] = ack_id
        if not self.send(MsgType.EVENT, body):
            fut.set_result(False)  # channel congested: cannot audit, so do not pass
            return fut
        self._pending[ack_id] = fut
        fut.add_done_callback(lambda _f: self._pending.pop(ack_id, None))
        return fut

    def _on_channel(self) -> None:
        while True:
            try:
                msg = self.channel.recv()
            except BlockingIOError:
                return
            except (ProtocolError, OSError):
                msg = None
            if msg is None:  # EOF: the supervisor is gone; nothing may pass unaudited
                self.loop.remove_reader(self.channel.fileno())
                self.loop.create_task(self._stop(audit=False))
                return
            msg.close_fds()
            self._on_message(msg)

    def _on_message(self, msg: Message) -> None:
        if msg.type == MsgType.ACK:
            fut = self._pending.get(msg.body.get("ack_id", -1))
            if fut is not None and not fut.done():
                fut.set_result(msg.body.get("ok") is True)
        elif msg.type == MsgType.CONTROL:
            op = msg.body.get("op")
            if op == "deny-new":
                self.deny_new = True
            elif op == "allow-new":
                self.deny_new = False
                if self.refused_while_denied:
                    n, self.refused_while_denied = self.refused_while_denied, 0
                    self.event(make_event(
                        "connections-refused",
                        f"{n} connections refused while the audit sink was down",
                        level="warning", category=["network"], type=["connection", "denied"],
                        outcome="success", reason="audit-sink-down", agentpen={"count": n}))
            elif op == "shutdown":
                self.loop.create_task(self._stop(audit=True))
            elif op == "probe-exec" and self.debug_ops:
                self.send(MsgType.STATUS, {"probe": "exec", **_probe_exec()})
                return
            else:
                self.event(make_event("control-ignored", f"unknown CONTROL op {op!r}",
                                      level="warning", type=["info"]))
                return
            # Acknowledge state changes so the supervisor (and tests) know they took effect.
            self.send(MsgType.STATUS, {"control": op, "deny_new": self.deny_new})

    # -- connections --------------------------------------------------------------------

    def next_id(self) -> str:
        return f"{self.incarnation}-{next(self._ids)}"

    async def resolve(self, host: str, port: int) -> list[Any]:
        if self._resolver is not None:
            return await self._resolver(host, port, type=socket.SOCK_STREAM)
        return await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _expire(task: asyncio.Task[None], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _pin_targets(pins: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """host -> (normalised IP literal, port) for each pin whose address is an IP."""
    out = {}
    for host, u in pins.items():
        with contextlib.suppress(ValueError):
            out[host] = (str(ipaddress.ip_address(u.addr)), int(u.port))
    return out


def _probe_exec() -> dict[str, Any]:
    try:
        os.execv("/bin/true", ["true"])  # noqa: S606 - the probe: this must fail
    except OSError as exc:
        return {"exec_errno": exc.errno, "error": exc.strerror}
    return {}  # unreachable: exec replaced the process


class _Upstream(asyncio.Protocol):
    __slots__ = ("conn", "transport")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.down_bytes += len(data)
        conn.last = conn.loop.time()
        conn.transport.write(data)

    def eof_received(self) -> bool:
        return self.conn.half_close(from_client=False)

    def pause_writing(self) -> None:  # upstream's send buffer is full: stop reading the client
        self.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.conn.closing:
            self.conn.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.upstream_lost(exc)


class Connection(asyncio.Protocol):
    """One sandbox client: hello -> decision -> dial -> splice -> summary."""

    # One per connection, touched on every callback: slots make it smaller and faster.
    __slots__ = (
        "__weakref__",
        "_task",
        "_timers",
        "cid",
        "client_eof",
        "client_gone",
        "close_reason",
        "closing",
        "deadline",
        "down_bytes",
        "error",
        "hello",
        "last",
        "loop",
        "parser",
        "peeked",
        "peeked_len",
        "pinned",
        "proxy",
        "rule",
        "sink",
        "source",
        "started",
        "t0",
        "transport",
        "up",
        "up_bytes",
        "up_gone",
        "up_ip",
        "up_port",
        "upstream_eof",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.cid = proxy.next_id()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: ClientHelloParser | None = ClientHelloParser()
        self.peeked: list[bytes] = []
        self.peeked_len = 0
        self.hello: ClientHello | None = None
        self.rule: str | None = None
        self.up: _Upstream | None = None
        self.sink: asyncio.Transport | None = None  # upstream transport once splicing
        self.up_gone = False
        self.up_ip: str | None = None
        self.up_port = 0
        self.deadline = 0.0
        self.pinned = False
        self.started = False  # an allowed/start event was sent: owe a summary
        self.closing = False
        self.client_eof = self.upstream_eof = False
        self.client_gone = False
        self.up_bytes = self.down_bytes = 0
        self.close_reason: str | None = None
        self.error: str | None = None
        self.t0 = time.monotonic_ns()
        self.last = self.loop.time()
        self._timers: list[asyncio.TimerHandle] = []
        self._task: asyncio.Task[None] | None = None
        self.source: dict[str, Any] = {}

    # -- asyncio.Protocol (client side) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.conns.add(self)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.source = {"ip": peer[0], "port": peer[1]} if peer[0] else {}
        p = self.proxy
        if p.deny_new:  # audit sink down: nothing new may start; counted, reported later
            p.refused_while_denied += 1
            self._finish_quietly()
            return
        if len(p.conns) > p.limits.max_connections:
            self.deny(f"concurrent connection cap ({p.limits.max_connections}) reached",
                      "connection-cap")
            return
        # TCP_NODELAY: uvloop sets it on every TCP transport, accepted or dialled
        # (test_uvloop_sets_nodelay guards that), so no extra syscalls here.
        transport.set_write_buffer_limits(high=p.limits.write_high)
        self._timers.append(self.loop.call_later(p.limits.hello_timeout, self._hello_timeout))

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            self.up_bytes += len(data)
            self.last = self.loop.time()
            sink.write(data)
            return
        if self.parser is None:  # after the hello, before the upstream is ready (paused)
            self._peek(data)
            return
        self._peek(data)
        if self.closing:
            return
        try:
            hello = self.parser.feed(data)
        except ClientHelloError as exc:
            self.deny(f"malformed ClientHello: {exc.reason}", "malformed-client-hello")
            return
        if hello is None:
            return
        self.parser = None
        self.hello = hello
        self.transport.pause_reading()
        self._cancel_timers()
        self._task = self.loop.create_task(self._admit(hello))

    def _peek(self, data: bytes) -> None:
        self.peeked.append(data)
        self.peeked_len += len(data)
        if self.peeked_len > 2 * 64 * 1024 + self.proxy.limits.write_high:
            self.deny("too many bytes before the upstream was ready", "peek-overflow")

    def eof_received(self) -> bool:
        if self.parser is not None or self.up is None:
            self.client_eof = True
            if self.parser is not None:
                self.deny("client closed before completing its ClientHello", "incomplete-hello")
            return True  # keep open: an admitted hello may still be forwarded, then EOF
        return self.half_close(from_client=True)

    def pause_writing(self) -> None:  # the client is slow: stop reading the upstream
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None and not self.closing:
            self.up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_gone = True
        if self.close_reason is None:
            self.close_reason = "client closed" if exc is None else f"client error: {exc}"
        if self.sink is not None and not self.up_gone:
            self.sink.close()  # flush what the client sent; upstream_lost() finishes
            return
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._done()

    @property
    def undecided(self) -> bool:
        """Accepted, still open, and neither denied nor past its recorded decision."""
        if self.closing or self.client_gone:
            return False
        return self.parser is not None or (self._task is not None and not self.started
                                           and not self._task.done())

    # -- decision ---------------------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        h = self.hello
        name = h.server_name if h else None
        f: dict[str, Any] = {
            "source": self.source or None,
            "destination": {"port": self.proxy.limits.upstream_port},
            "agentpen": {"connection_id": self.cid, "incarnation": self.proxy.incarnation},
        }
        if name:  # typed ECS fields carry no nulls
            f["destination"]["domain"] = name
        if h is not None:
            f["tls"] = {"client": {"server_name": name}} if name else None
            f["agentpen"]["ech"] = h.ech
            if h.alpn:
                f["agentpen"]["alpn"] = list(h.alpn)
        if self.rule:
            f["rule"] = {"name": self.rule}
        return f

    def deny(self, reason: str, code: str) -> None:
        """Block: audit (no ACK needed: nothing passes), alert the client, close."""
        if self.closing:
            return
        f = self._fields()
        name = self.hello.server_name if self.hello else None
        self.proxy.event(make_event(
            "connection-denied", f"blocked {name or 'connection'}: {reason}", level="warning",
            category=["network"], type=["connection", "denied"], outcome="success",
            reason=reason, **f, **({"event": {"code": code}})))
        with contextlib.suppress(Exception):
            if self.hello is not None:
                self.transport.write(ALERT_ACCESS_DENIED)
        self._finish_quietly()

    def _finish_quietly(self) -> None:
        self.closing = True
        self._cancel_timers()
        self.transport.close()

    def _hello_timeout(self) -> None:
        self.deny(f"ClientHello not complete within {self.proxy.limits.hello_timeout:g} s",
                  "hello-timeout")

    async def _admit(self, hello: ClientHello) -> None:
        p = self.proxy
        name = hello.server_name
        if name is None:
            self.deny("no SNI in ClientHello", "no-sni")
            return
        self.rule = p.allowlist.match_canonical(name)  # the parser's server_name is canonical
        would_block = self.rule is None
        if would_block and not p.learn:
            self.deny(f"{name} is not in the allowlist", "not-allowed")
            return
        pin = p.pins.get(name)
        self.pinned = pin is not None
        f = self._fields()
        f["agentpen"].update(upstream_pinned=self.pinned, would_block=would_block)
        if pin is not None:
            f["destination"].update(ip=pin.addr, port=pin.port)
        msg = (f"would block {name} (learn mode): allowed" if would_block
               else f"allowed {name} by {self.rule}")
        ack = p.decision(make_event(
            "connection-allowed", msg, level="warning" if would_block else "info",
            category=["network"], type=["connection", "allowed", "start"], outcome="success",
            reason="learn mode" if would_block else None, **f))
        # Queued means the supervisor may record it even if we never read its ACK (a
        # shutdown aborts us first): from here on the connection owes its summary.
        self.started = not ack.done()
        # A timer that settles the future, not asyncio.timeout: no cancellation
        # machinery on the per-connection path (same bound, same verdict).
        expire = self.loop.call_later(p.limits.ack_timeout, _settle, ack, False)
        try:
            ok = await ack
        finally:
            expire.cancel()
        if not ok or self.client_gone:  # not recorded: nothing may pass
            self.close_reason = "decision not recorded by the supervisor"
            self._finish_quietly()
            return
        try:
            await self._dial(name, pin)
        except Exception as exc:  # any dial failure ends the connection, audited
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        if self.up is None:
            self.close_reason = "upstream unavailable"
            self._finish_quietly()
            if self.client_gone:
                self._done()

    async def _dial(self, name: str, pin: Any) -> None:
        p = self.proxy
        if pin is not None:
            target = p.pin_targets.get(name)
            if target is None:
                self.error = f"pinned upstream {pin.addr!r} is not an IP address"
                return
            targets = [target]
        else:
            port = p.limits.upstream_port
            try:
                async with asyncio.timeout(p.limits.resolve_timeout):
                    infos = await p.resolve(name, port)
            except (TimeoutError, OSError) as exc:
                self.error = f"resolving {name} failed: {exc or 'timeout'}"
                return
            allowed, refused = vet(infos)
            if not allowed:
                why = "; ".join(f"{ip} ({r})" for ip, r in refused) or "no address"
                self.error = f"no public address for {name}: {why}"
                return
            targets = [(ip, port) for ip in allowed]
        errors = []
        for ip, port in targets:
            if self.client_gone:
                return
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            up = _Upstream(self)
            task = self._task
            assert task is not None
            expired: list[bool] = []
            # The bound as a plain timer that cancels this task, not asyncio.timeout
            # (which costs two getpid() syscalls and a context object per connection).
            timer = self.loop.call_later(p.limits.connect_timeout, _expire, task, expired)
            try:
                # `ip` is a validated literal: uvloop's numeric fast path, no lookup.
                await self.loop.create_connection(lambda up=up: up, host=ip, port=port, family=fam)
            except asyncio.CancelledError:
                if up.transport is not None:  # connected in the same instant: not used
                    up.transport.abort()
                if not expired or task.uncancel() > 0:
                    raise  # cancelled for another reason (the client left): not ours to eat
                errors.append(f"{ip}:{port}: connect timeout")
                continue
            except OSError as exc:
                errors.append(f"{ip}:{port}: {exc}")
                continue
            finally:
                timer.cancel()
            self.up_ip = ip
            self.up_port = port
            self._splice(up)
            return
        self.error = "; ".join(errors)

    # -- splice -------------------------------------------------------------------------------

    def _splice(self, up: _Upstream) -> None:
        self.up = up
        ut = up.transport
        assert ut is not None
        if self.client_gone:  # the client left while we dialled
            ut.close()
            return
        self.sink = ut
        ut.set_write_buffer_limits(high=self.proxy.limits.write_high)
        data = b"".join(self.peeked)
        self.peeked.clear()
        self.up_bytes += len(data)
        ut.write(data)
        if self.client_eof:
            self.half_close(from_client=True)
        else:
            self.transport.resume_reading()
        lim = self.proxy.limits
        self.last = self.loop.time()
        self.deadline = self.loop.time() + lim.max_lifetime
        # one timer for both idle timeout and lifetime: re-armed only when it fires
        self._timers.append(self.loop.call_later(min(lim.idle_timeout, lim.max_lifetime),
                                                 self._idle_check))

    def half_close(self, *, from_client: bool) -> bool:
        """One side sent FIN: pass it on; close when both have."""
        if from_client:
            self.client_eof = True
            if self.up is not None and self.up.transport is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    self.up.transport.write_eof()
        else:
            self.upstream_eof = True
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()
        if self.client_eof and self.upstream_eof:
            self.close_reason = self.close_reason or "both sides closed"
            self.transport.close()
            if self.up is not None and self.up.transport is not None:
                self.up.transport.close()
        return True

    def _idle_check(self) -> None:
        now = self.loop.time()
        lim = self.proxy.limits.idle_timeout
        if now >= self.deadline:
            self.abort(f"max lifetime {self.proxy.limits.max_lifetime:g} s")
        elif now - self.last >= lim:
            self.abort(f"idle for {lim:g} s")
        else:
            wait = min(lim - (now - self.last), self.deadline - now)
            self._timers.append(self.loop.call_later(wait, self._idle_check))

    def abort(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.closing = True
        self.transport.abort()
        if self.up is not None and self.up.transport is not None:
            self.up.transport.abort()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.up_gone = True
        if self.close_reason is None:
            self.close_reason = "upstream closed" if exc is None else f"upstream error: {exc}"
        if not self.client_gone:
            self.transport.close()  # flush what the upstream sent, then close
        else:
            self._done()

    # -- end ------------------------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def _done(self) -> None:
        """Both sides are gone: forget the connection and send the summary once."""
        if self not in self.proxy.conns:
            return
        self.proxy.conns.discard(self)
        self._cancel_timers()
        if not self.started:
            return
        f = self._fields()
        f["source"] = {**(self.source or {}), "bytes": self.up_bytes}
        f["destination"]["bytes"] = self.down_bytes
        if self.up_ip:
            f["destination"].update(ip=self.up_ip, port=self.up_port)
        f["agentpen"]["upstream_pinned"] = self.pinned
        f["agentpen"]["close_reason"] = self.close_reason
        failed = self.up_ip is None
        name = self.hello.server_name if self.hello else None
        self.proxy.event(make_event(
            "connection-closed",
            f"{name}: {'upstream error: ' + self.error if self.error else self.close_reason}",
            level="error" if failed else "info", category=["network"],
            type=["connection", "end"], outcome="failure" if failed else "success",
            event={"duration": time.monotonic_ns() - self.t0},
            error={"message": self.error} if self.error else None, **f))
