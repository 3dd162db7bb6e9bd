"""The proxy worker: SNI-gated TLS passthrough (docs/proxy.md).

uvloop runs the channel, the timers and DNS; the connections' sockets live in the
worker's own edge-triggered epoll set, which uvloop watches as one descriptor.

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
import errno
import ipaddress
import itertools
import os
import select
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvloop  # imported here so a supervisor that imports this module forks warm workers
from agentpen.core import osutil
from agentpen.core.channel import (
    MAX_PACKET,
    PROTOCOL_VERSION,
    Channel,
    Message,
    MsgType,
    ProtocolError,
    decode,
    encode,
)
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
    listen_backlog: int = 65535  # the worker re-listen()s; the kernel clamps to somaxconn


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
        self._pending: dict[int, Connection] = {}  # ack_id -> connection waiting for it
        self._outbox: collections.deque[tuple[bytes, list[int], int | None]] = collections.deque()
        self._writing = False
        self._accepting: list[socket.socket] = []
        self._done: asyncio.Future[None] | None = None
        # Every connection socket, edge-triggered; uvloop watches this one descriptor.
        self.ep = select.epoll()
        self.fdmap: dict[int, Callable[[int], None]] = {}
        self.buf = bytearray(CHUNK)  # the splice's one read buffer, shared
        self.view = memoryview(self.buf)

    # -- lifecycle --------------------------------------------------------------------

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._done = self.loop.create_future()
        self.channel.sock.setblocking(False)
        self.loop.add_reader(self.channel.fileno(), self._on_channel)
        self.loop.add_reader(self.ep.fileno(), self._on_epoll)
        self.send(MsgType.HELLO, {"role": "proxy", "pid": os.getpid(),
                                  "version": PROTOCOL_VERSION, "incarnation": self.incarnation})
        for sock in self.listeners:
            sock.setblocking(False)
            # Linux copies TCP_NODELAY to each accepted socket: one setsockopt, not one per
            # connection.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # listen() again: the backlog the kernel clamps to somaxconn of its namespace.
            sock.listen(self.limits.listen_backlog)
            self.loop.add_reader(sock.fileno(), self._on_accept, sock)
            self._accepting.append(sock)
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
            self._close_listeners()
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.channel.fileno())
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.ep.fileno())

    def _close_listeners(self) -> None:
        """Our copies only: the supervisor's keep the backlog alive for the next worker."""
        for sock in self._accepting:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self._accepting.clear()

    def _on_accept(self, sock: socket.socket) -> None:
        try:
            conn, addr = sock.accept()  # non-blocking listener: accept4 only, no other call
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors or memory: the cap should prevent it; do not spin on
                # a level-triggered listener meanwhile.
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(0.1, self._resume_accept, sock)
            return
        Connection(self, conn, addr)

    def _resume_accept(self, sock: socket.socket) -> None:
        if sock in self._accepting:
            self.loop.add_reader(sock.fileno(), self._on_accept, sock)

    def _on_epoll(self) -> None:
        try:
            events = self.ep.poll(0, 256)
        except InterruptedError:
            return
        fdmap = self.fdmap
        for fd, ev in events:
            handler = fdmap.get(fd)
            if handler is None:  # closed earlier in this batch
                continue
            try:
                handler(ev)
            except Exception as exc:  # a bug must not strand the rest of the batch
                conn = getattr(handler, "__self__", None)
                if isinstance(conn, Connection):
                    conn.abort(f"internal error: {type(exc).__name__}: {exc}")

    async def _stop(self, *, audit: bool) -> None:
        if audit:
            self._accept_backlog()
        self._close_listeners()
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

    def _accept_backlog(self) -> None:
        """Connections the sandbox made that still wait in the listen backlog are accepted
        now, so that each one is judged and recorded like any other (closing our copy of
        the listener would leave them to the supervisor's, unanswered). Bounded."""
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.setblocking(False)
            for _ in range(self.limits.max_connections):
                try:
                    conn, addr = sock.accept()
                except OSError:  # BlockingIOError: the backlog is empty
                    break
                Connection(self, conn, addr)

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

    def decision(self, body: dict[str, Any], conn: Connection) -> bool:
        """Send an event that must be recorded before `conn` acts on it; its ACK calls
        conn.on_ack(). False when it could not be queued (channel congested: cannot audit,
        so do not pass)."""
        ack_id = next(self._acks)
        body["ack_id"] = ack_id
        if not self.send(MsgType.EVENT, body):
            return False
        self._pending[ack_id] = conn
        conn.ack_id = ack_id
        return True

    def _on_channel(self) -> None:
        """One message per call (the reader is level-triggered: uvloop calls again while
        more wait), read with a plain recv(): no trailing EAGAIN read per ACK, and no
        ancillary data to parse (the supervisor sends the worker no descriptors; any
        would be closed by the kernel, and the worker has no use for SCM_CREDENTIALS)."""
        try:
            data = self.channel.sock.recv(MAX_PACKET)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        msg = None
        if data:
            with contextlib.suppress(ProtocolError):
                msg = decode(data, [])
        if msg is None:  # EOF or garbage: the supervisor is gone; nothing may pass unaudited
            self.loop.remove_reader(self.channel.fileno())
            self.loop.create_task(self._stop(audit=False))
            return
        self._on_message(msg)

    def _on_message(self, msg: Message) -> None:
        if msg.type == MsgType.ACK:
            conn = self._pending.pop(msg.body.get("ack_id", -1), None)
            if conn is not None:
                conn.on_ack(msg.body.get("ok") is True)
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


# -- one connection -------------------------------------------------------------------------------
#
# Both sockets of a connection are plain non-blocking sockets in the worker's own
# edge-triggered epoll set (Proxy.ep), which uvloop watches as one descriptor. No uvloop
# transport, no coroutine and one timer per connection: each transport cost a
# setsockopt, a getsockname, a getpeername and several epoll_ctl calls, and the
# coroutines and futures most of the Python left on the per-connection path.

# Connection phases.
HELLO, DECIDING, RESOLVING, DIALLING, SPLICE, CLOSED = range(6)

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_RDHUP = select.EPOLLRDHUP
_HUP = select.EPOLLHUP
_ERR = select.EPOLLERR
_READABLE = _IN | _RDHUP | _HUP | _ERR  # something to read: data, EOF or an error
_ENDED = _RDHUP | _HUP | _ERR  # ... and reading until EOF/error is due even after a short read
_ET = select.EPOLLET
# EPOLLOUT only while needed: for a connect() to complete, or once a write waited. Kept in
# the mask, every state change (our own FIN acknowledged, ...) would wake the loop.
CLIENT_EVENTS = _IN | _RDHUP | _ET
UPSTREAM_EVENTS = CLIENT_EVENTS | _OUT
_DONTWAIT = socket.MSG_DONTWAIT  # accepted sockets stay in blocking mode: no fcntl per accept
HELLO_READ = 64 * 1024 + 5  # a ClientHello is at most 64 KiB (the parser's bound) + a header
CHUNK = 256 * 1024  # one read; also the most a direction holds in userspace (backpressure)


class _Side:
    """One socket of a connection, as the splice sees it (edge-triggered: the flags
    remember what epoll said until a read or write shows otherwise)."""

    __slots__ = ("eof", "fd", "hup", "nbytes", "pend", "rd", "shut", "sock", "watch_out", "wr")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1
        self.rd = False  # may have bytes (or EOF) to read
        self.wr = True  # may accept bytes
        self.hup = False  # the peer finished or failed: read until EOF even after a short read
        self.eof = False  # EOF read from it
        self.shut = False  # we sent it our FIN
        self.pend = b""  # bytes waiting to be written to it
        self.nbytes = 0  # bytes read from it
        self.watch_out = False  # EPOLLOUT in its epoll mask


class Connection:
    """One sandbox client: hello -> decision -> dial -> splice -> summary."""

    # One per connection, touched on every event: slots make it smaller and faster.
    __slots__ = (
        "ack_id",
        "c",
        "cid",
        "close_reason",
        "deadline",
        "dial_ip",
        "dial_port",
        "error",
        "errors",
        "hello",
        "last",
        "life_end",
        "loop",
        "parser",
        "peeked",
        "peeked_len",
        "phase",
        "pinned",
        "proxy",
        "rule",
        "source",
        "started",
        "t0",
        "targets",
        "task",
        "timer",
        "timer_at",
        "u",
        "up_ip",
        "up_port",
    )

    def __init__(self, proxy: Proxy, sock: socket.socket, addr: Any) -> None:
        self.proxy = proxy
        self.loop = loop = proxy.loop
        self.cid = proxy.next_id()
        self.t0 = time.monotonic_ns()
        self.phase = HELLO
        self.c = c = _Side()
        c.sock = sock
        c.fd = sock.fileno()
        self.u = _Side()
        self.parser: ClientHelloParser | None = ClientHelloParser()
        self.peeked: list[bytes] = []
        self.peeked_len = 0
        self.hello: ClientHello | None = None
        self.rule: str | None = None
        self.pinned = False
        self.started = False  # an allowed/start event was queued: owe a summary
        self.ack_id = 0
        self.targets: list[tuple[str, int]] = []
        self.errors: list[str] = []
        self.dial_ip = ""
        self.dial_port = 0
        self.up_ip: str | None = None
        self.up_port = 0
        self.close_reason: str | None = None
        self.error: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline = 0.0
        self.life_end = 0.0
        self.last = 0.0
        # accept() returned the peer address: no getpeername()
        self.source: dict[str, Any] = {"ip": addr[0], "port": addr[1]} if addr and addr[0] else {}
        p = proxy
        p.conns.add(self)
        if p.deny_new:  # audit sink down: nothing new may start; counted, reported later
            p.refused_while_denied += 1
            self._close()
            return
        if len(p.conns) > p.limits.max_connections:
            self.deny(f"concurrent connection cap ({p.limits.max_connections}) reached",
                      "connection-cap")
            return
        # TCP_NODELAY: inherited from the listener, set once in serve() (Linux copies it to
        # accepted sockets; test_accepted_sockets_inherit_nodelay guards that).
        try:
            p.ep.register(c.fd, CLIENT_EVENTS)
        except OSError as exc:  # ENOMEM, or max_user_watches reached
            self._close(f"cannot watch the connection: {exc}")
            return
        p.fdmap[c.fd] = self._on_client
        self._arm(loop.time() + p.limits.hello_timeout)

    # -- events -------------------------------------------------------------------------------

    def _on_client(self, ev: int) -> None:
        c = self.c
        if ev & _READABLE:
            c.rd = True
            if ev & _ENDED:
                c.hup = True
        if ev & _OUT:
            c.wr = True
        phase = self.phase
        if phase == SPLICE:
            self._moved(c, self.u, ev)
        elif phase == HELLO:
            self._read_hello()
        # otherwise the client waits (not read) until the upstream is ready

    def _on_upstream(self, ev: int) -> None:
        u = self.u
        if ev & _READABLE:
            u.rd = True
            if ev & _ENDED:
                u.hup = True
        if ev & _OUT:
            u.wr = True
        phase = self.phase
        if phase == SPLICE:
            self._moved(u, self.c, ev)
        elif phase == DIALLING:
            if ev & _ERR:
                assert u.sock is not None
                err = u.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self._dial_failed(str(OSError(err, os.strerror(err))) if err else "connection failed")
            elif ev & _OUT:
                self._splice()

    # -- timer: one per connection, re-armed lazily -------------------------------------------

    def _arm(self, deadline: float) -> None:
        """The current phase must end by `deadline`. The one timer is moved only if it
        would fire too late; a timer that fires early re-arms itself."""
        self.deadline = deadline
        t = self.timer
        if t is None or deadline < self.timer_at:
            if t is not None:
                t.cancel()
            self.timer = self.loop.call_at(deadline, self._on_timer)
            self.timer_at = deadline

    def _on_timer(self) -> None:
        self.timer = None
        phase = self.phase
        if phase == CLOSED:
            return
        now = self.loop.time()
        lim = self.proxy.limits
        if phase == SPLICE:
            if now >= self.life_end:
                self.abort(f"max lifetime {lim.max_lifetime:g} s")
                return
            idle_at = self.last + lim.idle_timeout
            if now >= idle_at:
                self.abort(f"idle for {lim.idle_timeout:g} s")
                return
            self._arm(min(idle_at, self.life_end))
        elif now < self.deadline:
            self._arm(self.deadline)
        elif phase == HELLO:
            self.deny(f"ClientHello not complete within {lim.hello_timeout:g} s", "hello-timeout")
        elif phase == DECIDING:  # no ACK in time: not recorded, so nothing may pass
            self.proxy._pending.pop(self.ack_id, None)
            self._close("decision not recorded by the supervisor")
        elif phase == DIALLING:
            self._dial_failed("connect timeout")
        # RESOLVING: bounded by its own resolve_timeout

    # -- hello ----------------------------------------------------------------------------------

    def _read_hello(self) -> None:
        c = self.c
        sock = c.sock
        assert sock is not None
        while c.rd:
            try:
                data = sock.recv(HELLO_READ, _DONTWAIT)
            except BlockingIOError:
                c.rd = False
                return
            except OSError as exc:
                self._close(f"client error: {exc}")
                return
            if not data:
                c.eof = True
                self.deny("client closed before completing its ClientHello", "incomplete-hello")
                return
            if len(data) < HELLO_READ and not c.hup:
                c.rd = False  # a short read emptied the socket; the next byte is a new edge
            self.peeked.append(data)
            self.peeked_len += len(data)
            try:
                hello = self.parser.feed(data)  # type: ignore[union-attr]
            except ClientHelloError as exc:
                self.deny(f"malformed ClientHello: {exc.reason}", "malformed-client-hello")
                return
            if hello is not None:
                self.parser = None
                self.hello = hello
                self._decide(hello)
                return
            if self.peeked_len > 2 * 64 * 1024 + self.proxy.limits.write_high:
                self.deny("too many bytes before the upstream was ready", "peek-overflow")
                return

    @property
    def undecided(self) -> bool:
        """Accepted, still open, and neither denied nor past its recorded decision."""
        return self.phase == HELLO

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
        if self.phase == CLOSED:
            return
        f = self._fields()
        name = self.hello.server_name if self.hello else None
        self.proxy.event(make_event(
            "connection-denied", f"blocked {name or 'connection'}: {reason}", level="warning",
            category=["network"], type=["connection", "denied"], outcome="success",
            reason=reason, **f, **({"event": {"code": code}})))
        if self.hello is not None and self.c.sock is not None:
            with contextlib.suppress(OSError):  # 7 bytes into an unused send buffer
                self.c.sock.send(ALERT_ACCESS_DENIED, _DONTWAIT)
        self._close()

    def _decide(self, hello: ClientHello) -> None:
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
        self.phase = DECIDING  # the client is not read until the upstream is ready
        if not p.decision(self._allowed_event(name, pin, would_block), self):
            self._close("decision not recorded by the supervisor")  # channel congested
            return
        # Queued means the supervisor may record it even if we never read its ACK (a
        # shutdown aborts us first): from here on the connection owes its summary.
        self.started = True
        self._arm(self.loop.time() + p.limits.ack_timeout)

    def on_ack(self, ok: bool) -> None:
        """The supervisor answered the decision: recorded (ok) or not."""
        if self.phase != DECIDING:
            return
        if not ok:  # not recorded: nothing may pass
            self._close("decision not recorded by the supervisor")
            return
        p = self.proxy
        name = self.hello.server_name  # type: ignore[union-attr]
        assert name is not None
        pin = p.pins.get(name)
        if pin is not None:
            target = p.pin_targets.get(name)
            if target is None:
                self.error = f"pinned upstream {pin.addr!r} is not an IP address"
                self._close("upstream unavailable")
                return
            self.targets = [target]
            self._dial_next()
        else:
            self.phase = RESOLVING
            self.task = self.loop.create_task(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        p = self.proxy
        port = p.limits.upstream_port
        try:
            async with asyncio.timeout(p.limits.resolve_timeout):
                infos = await p.resolve(name, port)
        except (TimeoutError, OSError) as exc:
            self.task = None
            self.error = f"resolving {name} failed: {exc or 'timeout'}"
            self._close("upstream unavailable")
            return
        self.task = None
        if self.phase != RESOLVING:
            return
        allowed, refused = vet(infos)
        if not allowed:
            why = "; ".join(f"{ip} ({r})" for ip, r in refused) or "no address"
            self.error = f"no public address for {name}: {why}"
            self._close("upstream unavailable")
            return
        self.targets = [(ip, port) for ip in allowed]
        self._dial_next()

    # -- dial ---------------------------------------------------------------------------------

    def _dial_next(self) -> None:
        """Dial the next vetted literal (in order); the connection closes, audited, when
        none is left."""
        p = self.proxy
        while self.targets:
            ip, port = self.targets.pop(0)
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            try:
                s = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:
                self.errors.append(f"{ip}:{port}: {exc}")
                continue
            # `ip` is a validated literal: connect_ex() parses it, no lookup.
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = s.connect_ex((ip, port))
                if not err or err == errno.EINPROGRESS:
                    p.ep.register(s.fileno(), UPSTREAM_EVENTS)
            except OSError as exc:
                err = exc.errno or errno.EINVAL
            if err and err != errno.EINPROGRESS:
                s.close()
                self.errors.append(f"{ip}:{port}: {OSError(err, os.strerror(err))}")
                continue
            u = self.u
            u.sock = s
            u.fd = s.fileno()
            p.fdmap[u.fd] = self._on_upstream
            self.dial_ip, self.dial_port = ip, port
            self.phase = DIALLING
            self._arm(self.loop.time() + p.limits.connect_timeout)
            return
        self.error = "; ".join(self.errors)
        self._close("upstream unavailable")

    def _dial_failed(self, why: str) -> None:
        self.errors.append(f"{self.dial_ip}:{self.dial_port}: {why}")
        self._drop_upstream()
        self._dial_next()

    def _drop_upstream(self) -> None:
        u = self.u
        if u.sock is not None:
            self.proxy.fdmap.pop(u.fd, None)
            u.sock.close()  # closing the last reference also leaves the epoll set
            u.sock = None
        self.u = _Side()

    # -- splice -------------------------------------------------------------------------------

    def _splice(self) -> None:
        self.phase = SPLICE
        # Connected: EPOLLOUT again only if a write has to wait. MOD reports pending input.
        self.proxy.ep.modify(self.u.fd, CLIENT_EVENTS)
        self.up_ip, self.up_port = self.dial_ip, self.dial_port
        data = b"".join(self.peeked)  # the hello (and anything sent with it) first
        self.peeked.clear()
        self.c.nbytes += len(data)
        self.u.pend = data
        now = self.loop.time()
        self.last = now
        lim = self.proxy.limits
        self.life_end = now + lim.max_lifetime
        # The connect deadline's timer, when it fires, re-arms for idle/lifetime.
        self.deadline = now + min(lim.idle_timeout, lim.max_lifetime)
        self._pump()

    def _pump(self) -> None:
        """Move what can move, both ways; pass each FIN on once its direction is flushed."""
        c, u = self.c, self.u
        self.last = self.loop.time()
        if not self._flow(c, u) or not self._flow(u, c):
            return
        if c.eof and u.eof and c.shut and u.shut:
            self._close("both sides closed")

    def _moved(self, side: _Side, other: _Side, ev: int) -> None:
        """An event on `side` while splicing: only the directions it can unblock."""
        if ev & _ERR and side.eof:  # reset after its FIN: no read would report it
            self._reset(side)
            return
        self.last = self.loop.time()
        if ev & _OUT and side.pend and not self._flow(other, side):
            return
        if side.rd and not self._flow(side, other):
            return
        if side.eof and other.eof and side.shut and other.shut:
            self._close("both sides closed")

    def _flow(self, src: _Side, dst: _Side) -> bool:
        """src -> dst. At most one chunk waits in userspace per direction: while dst has
        bytes pending, src is not read (backpressure). False once the connection closed."""
        if dst.pend:
            if not dst.wr:
                return True
            if not self._write(dst, dst.pend):
                return self.phase != CLOSED
        if not src.eof and src.rd:
            buf = self.proxy.buf
            view = self.proxy.view
            sock = src.sock
            assert sock is not None
            while True:
                try:
                    n = sock.recv_into(buf, CHUNK, _DONTWAIT)
                except BlockingIOError:
                    src.rd = False
                    break
                except OSError as exc:
                    self._failed(src, exc)
                    return False
                if n == 0:
                    src.eof = True
                    break
                src.nbytes += n
                if n < CHUNK and not src.hup:
                    src.rd = False
                if not dst.wr:
                    dst.pend = bytes(view[:n])
                    self._watch_out(dst)
                    return True
                if not self._write(dst, view[:n]):
                    return self.phase != CLOSED
                if not src.rd:
                    break
        if src.eof and not dst.pend and not dst.shut:
            dst.shut = True
            if dst.eof and src.shut:  # the last FIN to pass on: close() sends it (both
                self._close("both sides closed")  # sockets were read to EOF: no RST)
                return False
            if dst.sock is not None:
                with contextlib.suppress(OSError):  # the peer may be gone already
                    dst.sock.shutdown(socket.SHUT_WR)
        return True

    def _write(self, dst: _Side, data: Any) -> bool:
        """Write to dst; True when all of it went. What did not fit waits in dst.pend."""
        sock = dst.sock
        assert sock is not None
        try:
            n = sock.send(data, _DONTWAIT)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._failed(dst, exc)
            return False
        if n == len(data):
            dst.pend = b""
            return True
        dst.pend = bytes(data[n:])
        dst.wr = False
        self._watch_out(dst)
        return False

    def _watch_out(self, side: _Side) -> None:
        if not side.watch_out:
            side.watch_out = True
            self.proxy.ep.modify(side.fd, CLIENT_EVENTS | _OUT)  # reports it if writable now

    def _failed(self, side: _Side, exc: OSError) -> None:
        """A socket error (reset, broken pipe): give the other side what it is owed, close."""
        if self.close_reason is None:
            who = "client" if side is self.c else "upstream"
            self.close_reason = f"{who} error: {exc}"
        other = self.u if side is self.c else self.c
        if other.pend and other.sock is not None:
            with contextlib.suppress(OSError):
                other.sock.send(other.pend, _DONTWAIT)
        self._close()

    def _reset(self, side: _Side) -> None:
        assert side.sock is not None
        err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(side, OSError(err, os.strerror(err)))
        else:
            self._pump()

    def abort(self, reason: str) -> None:
        self._close(reason)

    # -- end ------------------------------------------------------------------------------------

    def _close(self, reason: str | None = None) -> None:
        """Close both sockets, forget the connection and send the summary once."""
        if self.phase == CLOSED:
            return
        self.phase = CLOSED
        if self.close_reason is None:
            self.close_reason = reason
        p = self.proxy
        for side in (self.c, self.u):
            if side.sock is not None:
                p.fdmap.pop(side.fd, None)
                side.sock.close()  # closing the last reference also leaves the epoll set
                side.sock = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.ack_id:
            p._pending.pop(self.ack_id, None)
        p.conns.discard(self)
        if self.started:
            self._summary()

    def _summary(self) -> None:
        self.proxy.event(self._closed_event())

    # The two events every allowed connection sends, in exactly the shape make_event()
    # gives them (plus _fields()), built as literals: they are on the per-connection path.
    # test_connection_events_match_make_event holds them to that shape.

    def _allowed_event(self, name: str, pin: Any, would_block: bool) -> dict[str, Any]:
        h = self.hello
        assert h is not None
        p = self.proxy
        event: dict[str, Any] = {"kind": "event", "category": ["network"],
                                 "type": ["connection", "allowed", "start"], "outcome": "success"}
        if would_block:
            event["reason"] = "learn mode"
            msg = f"would block {name} (learn mode): allowed"
        else:
            msg = f"allowed {name} by {self.rule}"
        body: dict[str, Any] = {"action": "connection-allowed",
                                "level": "warning" if would_block else "info",
                                "message": msg, "event": event}
        if self.source:
            body["source"] = self.source
        dest: dict[str, Any] = {"port": p.limits.upstream_port, "domain": name}
        if pin is not None:
            dest["ip"] = pin.addr
            dest["port"] = pin.port
        body["destination"] = dest
        agentpen: dict[str, Any] = {"connection_id": self.cid, "incarnation": p.incarnation,
                                    "ech": h.ech}
        if h.alpn:
            agentpen["alpn"] = list(h.alpn)
        agentpen["upstream_pinned"] = pin is not None
        agentpen["would_block"] = would_block
        body["agentpen"] = agentpen
        body["tls"] = {"client": {"server_name": name}}
        if self.rule:
            body["rule"] = {"name": self.rule}
        return body

    def _closed_event(self) -> dict[str, Any]:
        h = self.hello
        p = self.proxy
        name = h.server_name if h else None
        failed = self.up_ip is None
        body: dict[str, Any] = {
            "action": "connection-closed",
            "level": "error" if failed else "info",
            "message": f"{name}: {'upstream error: ' + self.error if self.error else self.close_reason}",
            "event": {"kind": "event", "category": ["network"], "type": ["connection", "end"],
                      "outcome": "failure" if failed else "success",
                      "duration": time.monotonic_ns() - self.t0},
        }
        if self.error:
            body["error"] = {"message": self.error}
        body["source"] = {**self.source, "bytes": self.c.nbytes}
        dest: dict[str, Any] = {"port": p.limits.upstream_port}
        if name:
            dest["domain"] = name
        dest["bytes"] = self.u.nbytes
        if self.up_ip:
            dest["ip"] = self.up_ip
            dest["port"] = self.up_port
        body["destination"] = dest
        agentpen: dict[str, Any] = {"connection_id": self.cid, "incarnation": p.incarnation}
        if h is not None:
            agentpen["ech"] = h.ech
            if h.alpn:
                agentpen["alpn"] = list(h.alpn)
        agentpen["upstream_pinned"] = self.pinned
        agentpen["close_reason"] = self.close_reason
        body["agentpen"] = agentpen
        if name:
            body["tls"] = {"client": {"server_name": name}}
        if self.rule:
            body["rule"] = {"name": self.rule}
        return body
