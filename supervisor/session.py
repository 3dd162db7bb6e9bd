"""One confined session, from policy to exit status.

A single-threaded selectors loop owns everything: the signalfd, each worker's
channel, pasta's stderr, the proxy's process sentinel and the audit stream's
deadlines. Workers report; the supervisor decides, audits and forwards signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import time

from agentpen.core import __version__
from agentpen.core.channel import Channel, Message, MsgType, ProtocolError
from agentpen.core.digest import sha256
from agentpen.core.events import make_event
from agentpen.core.policy import Doors, SessionPolicy
from agentpen.core.record import field, record
from agentpen.supervisor.errors import EXIT_AGENTPEN, AgentpenError, SetupFailed
from agentpen.supervisor.signals import SignalFd
from agentpen.supervisor.workers import PRELOAD, NetnsWorker, ProxySupervisor

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

SETUP_TIMEOUT = 30.0  # from pasta's start to the command's start
TEARDOWN_TIMEOUT = 5.0
# The proxy's modules are preloaded for restarts once the command has run this long.
PROXY_WARM_AFTER = 1.0
# The first proxy starts this long after "go", or at the first connection if sooner.
PROXY_START_AFTER = 0.25
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@record
class Outcome:
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    fix: str | None = None

    def status(self) -> int:
        if self.error is not None and self.exit_code is None and self.signal is None:
            return EXIT_AGENTPEN
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else EXIT_AGENTPEN


@record
class Counters:
    connections_allowed: int = 0
    connections_denied: int = 0
    proxy_restarts: int = 0
    protocol_violations: int = 0
    signals_forwarded: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Session:
    def __init__(self, policy: SessionPolicy, audit: Any, log: Any, *, enforced: dict[str, Any],
                 netns: NetnsWorker | None = None) -> None:
        self.policy = policy
        self.audit = audit
        self.log = log
        self.early_netns = netns  # pasta started by the CLI before its own imports (start_pasta)
        self.enforced = enforced
        self.sel = selectors.DefaultSelector()
        self.netns: NetnsWorker | None = None
        self.proxy: ProxySupervisor | None = None
        self.outcome = Outcome()
        self.counters = Counters()
        self.sandbox_init_pid: int | None = None
        self.jail_pid: int | None = None
        self.started = time.monotonic()
        self.command_started: float | None = None
        self.done = False
        self.pasta_log = None
        self.pending_signal: tuple[int, int] | None = None  # (signo, sender) until the command's pid is known
        self.covers: list[Any] = []
        self.scratch_root: str | None = None  # private dirs behind scratch covers
        self.sandbox_gone = False  # the jail was reaped: no new connection can start
        self.proxy_warmed = False  # the proxy's modules preloaded for a restart (warm())
        self.proxy_start_at: float | None = None  # the first proxy's start, unless a connection comes first
        self.pins: dict[str, int] = {}  # pidfds of the jail and the sandbox's init (_pin)
        self.pasta_pidfd = -1
        self.go_ns: int | None = None
        self.guardian: Any = None
        # Learn mode: names contacted that the allowlist would have blocked (from the
        # proxy's would-block decisions and the DNS worker's learned lookups).
        self.learned: dict[str, int] = {}

    # -- audit helpers -------------------------------------------------------------

    def emit(self, body: dict[str, Any], *, sender: str = "supervisor", pid: int | None = None,
             durable: bool | None = None) -> int:
        seq = self.audit.emit(body, sender=sender, pid=pid if pid is not None else os.getpid(),
                              durable=durable)
        self._check_audit_health()
        return seq

    def _check_audit_health(self) -> None:
        failing = bool(getattr(self.audit, "failing", False))
        if failing != getattr(self, "_audit_was_failing", False):
            self._audit_was_failing = failing
            if failing and self.audit.healthy:  # --audit-failure continue: say what is lost
                self.log.error("audit sink failing; continuing without it (--audit-failure continue): "
                               "events are lost until it recovers")
        healthy = self.audit.healthy
        if healthy == getattr(self, "_audit_was_healthy", True):
            return
        self._audit_was_healthy = healthy
        if self.proxy and self.proxy.current:
            op = "allow-new" if healthy else "deny-new"
            with contextlib.suppress(OSError):
                self.proxy.current.channel.send(MsgType.CONTROL, {"op": op})
        if healthy:
            self.log.warning("audit sink recovered; new connections allowed again")
        else:
            self.log.error("audit sink failed; new connections are refused until it recovers")

    # -- start ---------------------------------------------------------------------

    def run(self) -> int:
        sigfd = SignalFd([*FORWARDED, signal.SIGCHLD, signal.SIGUSR1])
        # In the background while the sandbox holds the terminal: writing our own
        # messages must not stop us under `stty tostop`.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        self.sel.register(sigfd.fileno(), selectors.EVENT_READ, ("signal", None))
        from agentpen.supervisor.audit import AuditHalt

        try:
            self._start()
            self._loop(sigfd)
        except AuditHalt as exc:
            # --audit-failure halt: no unaudited work. Stop the command, report 125.
            self.outcome.error = f"audit sink failed and --audit-failure is halt: {exc}"
            self.outcome.exit_code = self.outcome.signal = None
            for w in (self.netns, self.proxy and self.proxy.current):
                if w:  # the proxy too: open connections stop now, not after the sandbox
                    with contextlib.suppress(OSError):
                        w.channel.send(MsgType.CONTROL, {"op": "shutdown"})
        except AgentpenError as exc:
            self.outcome.error, self.outcome.fix = exc.message, exc.fix
        except OSError as exc:  # a worker's channel broke under us (it died): one line, 125
            self.outcome.error = f"lost contact with a worker: {exc.strerror or exc}"
            self.outcome.exit_code = self.outcome.signal = None
        except KeyboardInterrupt:  # not expected with signals blocked; belt and braces
            self.outcome.error = "interrupted"
        finally:
            self._teardown()
            sigfd.close()
        return self._finish()

    def _start(self) -> None:
        p = self.policy
        # pasta first: its namespace setup overlaps with our own work below.
        if self.early_netns is not None:
            self.netns = self.early_netns
        else:
            self.netns = start_pasta(p)
        from agentpen.workers.jail.protect import plan_protection, protected_list, scratch_root_for

        # Persistence covers, computed once here so that the supervisor can remove the
        # placeholders bwrap creates in the project even if every worker was killed.
        root = scratch_root_for(p.project)
        self.covers = plan_protection(p.project, protected_list(p.protect, p.unprotect), root)
        if root and any(c.kind == "scratch" for c in self.covers):
            os.mkdir(root, 0o700)  # fails on anything already there, links included
            self.scratch_root = root
            for c in self.covers:
                if c.kind == "scratch":
                    os.mkdir(c.source, 0o700)
        # Before the sandbox can create anything: the guardian (forked before pasta) also
        # removes these if we are SIGKILLed.
        self.guardian = self.netns.guardian
        self.guardian.watch(self.covers, self.scratch_root)
        # The worker got its CONFIG when it was spawned (it is setting the namespace up
        # by now); the covers, and the policy as finally resolved, travel with "go".
        allow_hash = sha256("\n".join(sorted(p.allow)).encode()).hexdigest()
        # Durable before the netns worker may start the command (it waits for "go").
        self.audit.emit(make_event(
            "session-started",
            f"session started: {p.command_name} ({p.agent or 'no agent profile'}) in {p.project}",
            category=["process", "session"], type=["start"], outcome="success",
            process={"name": os.path.basename(p.command[0]), "args": [p.command_name, *p.command[1:]],
                     "executable": p.command[0], "working_directory": p.project},
            agentpen={
                "version": __version__, "profile": p.profile, "agent": p.agent, "project": p.project,
                "allowlist": list(p.allow), "allowlist_sha256": allow_hash,
                "upstreams": [f"{u.host}={u.addr}:{u.port}" for u in p.upstreams],
                "mounts": [f"{m.path}:{m.mode}" for m in p.mounts],
                "publish": [f"{x.host_port}:{x.sandbox_port}" for x in p.publish],
                "host_ports": list(p.host_ports), "layers": self.enforced,
                "env_names": sorted(p.env),
            },
        ), sender="supervisor", pid=os.getpid(), durable=True)
        # While we wait for the namespace to be verified: structlog for the console lines
        # printed after "go" (a thread; no fork happens before the next PRELOAD.join()).
        # None held (a quieter --log-level): no import at all, its CPU would only compete
        # with the command's start (a later warning imports it then).
        if getattr(self.log, "holding", lambda: True)():
            PRELOAD.start("structlog")
        if not self.audit.healthy:
            # The start of the session is not on disk: no command may run unrecorded.
            self._audit_was_healthy = False  # this is the one message about it
            raise SetupFailed("the audit stream could not record the session start",
                              fix="check the audit sink (disk space, permissions, the --audit-fd reader)")
        self.emit(make_event(
            "worker-started", f"pasta started (pid {self.netns.pasta.pid})",
            category=["process"], type=["start"], outcome="success",
            process={"pid": self.netns.pasta.pid, "name": "pasta"}, agentpen={"role": "pasta"},
        ))
        from agentpen.workers.netns.pasta import PastaLog

        self.pasta_log = PastaLog()
        self.sel.register(self.netns.channel.fileno(), selectors.EVENT_READ, ("netns", None))
        assert self.netns.pasta.stderr is not None
        self.sel.register(self.netns.pasta.stderr.fileno(), selectors.EVENT_READ, ("pasta-stderr", None))
        # pasta's exit wakes the loop at once (its stderr may stay open in its holder).
        with contextlib.suppress(OSError):
            self.pasta_pidfd = os.pidfd_open(self.netns.pasta.pid)
            self.sel.register(self.pasta_pidfd, selectors.EVENT_READ, ("pasta-exit", None))

    # -- loop ------------------------------------------------------------------------

    def _loop(self, sigfd: SignalFd) -> None:
        setup_deadline = time.monotonic() + SETUP_TIMEOUT
        while not self.done:
            now = time.monotonic()
            timeout = 1.0
            if self.command_started is None:
                if now > setup_deadline:
                    raise SetupFailed(f"the sandbox was not ready within {SETUP_TIMEOUT:.0f} s")
                timeout = min(timeout, setup_deadline - now)
            if self.proxy and self.proxy.restart_at is not None:
                timeout = min(timeout, max(0.0, self.proxy.restart_at - now))
            if self.pending_signal is not None:
                timeout = min(timeout, 0.01)  # until the command's pid is known
            if self.proxy_start_at is not None:
                timeout = min(timeout, max(0.0, self.proxy_start_at - now))
            warm_at = None
            if self.proxy and not self.proxy_warmed and self.command_started is not None:
                warm_at = self.command_started + PROXY_WARM_AFTER
                timeout = min(timeout, max(0.0, warm_at - now))
            deadline = self.audit.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
            for key, _ in self.sel.select(timeout):
                kind, ref = key.data
                if kind == "signal":
                    for info in sigfd.read():
                        self._on_signal(info.signo, info.pid)
                elif kind == "netns":
                    self._on_netns_readable()
                elif kind == "pasta-stderr":
                    self._on_pasta_stderr()
                elif kind == "pasta-exit":
                    self.sel.unregister(key.fd)
                    os.close(self.pasta_pidfd)
                    self.pasta_pidfd = -1
                    if self.netns and self.netns.pasta.poll() is not None and not self.done:
                        self._on_pasta_exit()
                elif kind == "listener":  # a connection waits: the proxy starts now
                    self._start_first_proxy()
                elif kind == "proxy":
                    self._on_proxy_readable(ref)
                elif kind == "proxy-exit":
                    self._on_proxy_exit(ref)
                if self.done:
                    break
            now = time.monotonic()
            if self.proxy_start_at is not None and now >= self.proxy_start_at and not self.done:
                self._start_first_proxy()
            if self.proxy and self.proxy.restart_at is not None and now >= self.proxy.restart_at:
                self._start_proxy(restart=True)
            if self.pending_signal is not None and not self.done and self._command_pid():
                (signo, sender), self.pending_signal = self.pending_signal, None
                self._on_signal(signo, sender)
            if warm_at is not None and now >= warm_at and self.proxy:
                self.proxy_warmed = True
                self.proxy.warm()
            self.audit.tick(now)
            self._check_audit_health()
            if self.netns and self.netns.pasta.poll() is not None and not self.done:
                self._on_pasta_exit()

    # -- signals -----------------------------------------------------------------------

    def _on_signal(self, signo: int, sender: int) -> None:
        if signo == signal.SIGCHLD:
            return  # exits are seen through sentinels, pidfds and pasta.poll()
        if signo in (signal.SIGUSR1, signal.SIGHUP):
            self.audit.reopen()
            if signo == signal.SIGUSR1:
                return
        name = signal.Signals(signo).name
        target = self._command_pid()
        if target is None and self.go_ns is not None and not self.done:
            # "go" is out: the command is starting, or started and its pid not read yet
            # (the worker's messages may sit behind this signal). Held, then forwarded.
            self.pending_signal = (signo, sender)
            return
        self.emit(make_event(
            "signal-forwarded" if target else "signal-received",
            f"{name} from pid {sender} " + (f"forwarded to the command (pid {target})" if target
                                            else "before the command started: ending the session"),
            category=["process"], type=["info"], outcome="success",
            process={"pid": target} if target else None,
            agentpen={"signal": name, "sender_pid": sender},
        ))
        if target:
            self.counters.signals_forwarded += 1
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signo)
        else:
            self.outcome.signal = signo
            self.outcome.error = f"{name} before the command started"
            self.done = True

    def _command_pid(self) -> int | None:
        """The command is the child of bwrap's init (pid 1 of the sandbox)."""
        if self.sandbox_init_pid is None:
            return None
        kids = _children(self.sandbox_init_pid)
        return kids[0] if kids else None

    # -- netns worker --------------------------------------------------------------------

    def _recv(self, ch: Channel, role: str) -> Message | None:
        try:
            return ch.recv()
        except BlockingIOError:
            raise  # nothing more to read: not the worker's fault
        except (ProtocolError, OSError) as exc:
            self.counters.protocol_violations += 1
            self.emit(make_event("protocol-violation", f"bad message from the {role} worker: {exc}",
                                 level="error", category=["process"], type=["error"],
                                 outcome="failure", agentpen={"role": role}))
            return None

    def _on_netns_readable(self) -> bool:
        """Handle one message; False once the channel is closed."""
        assert self.netns is not None
        msg = self._recv(self.netns.channel, "netns")
        if msg is None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.netns.channel.fileno())
            if self.outcome.exit_code is None and self.outcome.signal is None and not self.outcome.error:
                self.outcome.error = "the netns worker went away before reporting the command's exit"
            self.done = True
            return False
        if msg.type == MsgType.HELLO:
            self.netns.pid = msg.sender_pid
            msg.close_fds()
            return True
        if self.netns.pid is not None and msg.sender_pid not in (self.netns.pid, None):
            self.counters.protocol_violations += 1
            msg.close_fds()
            return True
        if msg.type == MsgType.EVENT:
            self.emit(msg.body, sender="netns", pid=msg.sender_pid)
            fields = msg.body.get("agentpen")
            if isinstance(fields, dict) and fields.get("step") == "netns-cross-checked":
                self.netns.end_verifier()  # it has answered: reap it now, not at the end
        elif msg.type == MsgType.FDS:
            # Held from now on; the first proxy is forked once "go" is sent (see above).
            self.proxy = ProxySupervisor(msg.take_fds(), self.policy)
        elif msg.type == MsgType.STATUS:
            self._on_netns_status(msg.body)
        msg.close_fds()
        return True

    def _on_netns_status(self, body: dict[str, Any]) -> None:
        state = body.get("state")
        if state == "verified":
            if self.outcome.error or self.done:
                return  # the session is failing (pasta died, a signal, the audit): no "go"
            self.emit(make_event(
                "sandbox-network-verified", "sandbox network verified: only loopback, proxy is the one door",
                category=["network", "configuration"], type=["info"], outcome="success",
                agentpen={"network": body.get("network"), "nftables": body.get("nftables")},
            ), durable=True)
            # The session start is on disk (emitted durably before this point).
            self.go_ns = time.time_ns()  # from here on the sandbox can write the project
            try:
                self.netns.channel.send(MsgType.CONTROL, {  # type: ignore[union-attr]
                    "op": "go", "policy": self.policy.to_json(),
                    "covers": [{"path": c.path, "kind": c.kind, "rel": c.rel, "data": c.data.decode(),
                                "source": c.source} for c in self.covers],
                })
            except OSError:
                self.outcome.error = "the netns worker went away before the command started"
                self.done = True
                return
            # The listeners already queue connections: the proxy starts on the first one, or
            # PROXY_START_AFTER after "go", whichever comes first, not during the command's
            # own start (the fork, multiprocess, uvloop and libseccomp in the child: ~80 ms
            # of CPU that would compete with bwrap on a small machine).
            if self.proxy is not None and not self.proxy.incarnations:
                self.proxy_start_at = time.monotonic() + PROXY_START_AFTER
                for fd in self.proxy.listen_fds:
                    self.sel.register(fd, selectors.EVENT_READ, ("listener", None))
            self.log.release()  # the info lines held until the command starts (cli.py)
            _collect_garbage_again()
        elif state == "jail-started":
            # The netns worker lives in pasta's pid namespace: its pids are not ours.
            # Find the host pid from the process tree (the jail is its only child).
            kids = _children(self.netns.pid) if self.netns and self.netns.pid else []  # type: ignore[union-attr]
            self.jail_pid = kids[0] if kids else None
            self._pin("jail", self.jail_pid)
            self.command_started = time.monotonic()
            self.emit(make_event(
                "worker-started", f"jail started (bwrap pid {self.jail_pid})",
                category=["process"], type=["start"], outcome="success",
                process={"pid": self.jail_pid, "name": "bwrap"}, agentpen={"role": "jail"},
            ))
        elif state == "sandbox-started":
            kids = _children(self.jail_pid) if self.jail_pid else []
            self.sandbox_init_pid = kids[0] if kids else None
            self._pin("sandbox", self.sandbox_init_pid)
            self.emit(make_event(
                "command-started", f"command started in the sandbox: {self.policy.command_name}",
                category=["process"], type=["start"], outcome="success",
                process={"pid": self.sandbox_init_pid, "name": os.path.basename(self.policy.command[0]),
                         "args": [self.policy.command_name, *self.policy.command[1:]]},
            ))
        elif state == "sandbox-exit-code":
            self.outcome.exit_code = int(body["exit_code"])
        elif state == "exited":
            if self.outcome.error and self.outcome.exit_code is None and self.outcome.signal is None:
                # agentpen already ended the session (e.g. --audit-failure halt): the jail's
                # death by our SIGKILL must not turn that 125 into 137.
                self.done = True
                return
            if body.get("error"):
                self.outcome.error = f"the jail could not start the command: {body['error']}"
                self.outcome.exit_code = None
            elif "signal" in body:
                self.outcome.signal = int(body["signal"])
            elif self.outcome.exit_code is None:
                self.outcome.exit_code = int(body.get("exit_code", EXIT_AGENTPEN))
            elif int(body.get("exit_code", 0)) != 0 and self.outcome.exit_code == 0:
                self.outcome.exit_code = int(body["exit_code"])
            self.sandbox_gone = True  # bwrap reaped: every process of its pid namespace is dead
            self.done = True
        elif state == "failed":
            self.outcome.error = f"sandbox setup failed: {body.get('error')}"
            self.outcome.fix = body.get("fix")
            if body.get("traceback"):
                self.emit(make_event("worker-error", "netns worker traceback", level="error",
                                     category=["process"], type=["error"], outcome="failure",
                                     error={"stack_trace": body["traceback"]}))
            self.done = True

    def _on_pasta_stderr(self) -> None:
        assert self.netns is not None and self.netns.pasta.stderr is not None
        fd = self.netns.pasta.stderr.fileno()
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fd)
            bodies = self.pasta_log.finish()
        else:
            bodies = self.pasta_log.feed(data)
        for body in bodies:
            self.emit(body, sender="pasta", pid=self.netns.pasta.pid)

    def _on_pasta_exit(self) -> None:
        assert self.netns is not None
        forked = self.netns.forked is not None
        if not forked:
            # A pasta-started worker exits first: its last messages (the command's exit
            # status among them) may still be queued. Read them before deciding anything.
            self._drain(self.netns.channel, self._on_netns_readable, 2.0)
            if self.done:
                return
        code = self.netns.pasta.returncode
        self.emit(make_event(
            "worker-exited", f"pasta exited ({_describe(code)})",
            level="error" if not self.outcome.exit_code and self.command_started is None else "info",
            category=["process"], type=["end"], outcome="success" if code == 0 else "failure",
            process={"pid": self.netns.pasta.pid, "name": "pasta", "exit_code": code},
            agentpen={"role": "pasta"},
        ))
        if self.outcome.exit_code is None and self.outcome.signal is None and not self.outcome.error:
            self.outcome.error = f"pasta exited ({_describe(code)}) before the command finished"
            self.outcome.fix = "run agentpen --check"
        if forked:
            # pasta outlives a worker we forked (its holder ends with our end of the socket,
            # at teardown): gone now, it was killed, and the sandbox goes with it. What the
            # worker said until then is read, up to its end.
            self.netns.kill()
            self._drain(self.netns.channel, self._on_netns_readable, 2.0)
        self.done = True

    # -- proxy worker --------------------------------------------------------------------

    def _start_first_proxy(self) -> None:
        """The first incarnation (see "go"): on a waiting connection or the timer."""
        self.proxy_start_at = None
        if self.proxy is None or self.proxy.incarnations:
            return
        for fd in self.proxy.listen_fds:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
        self._start_proxy(restart=False)

    def _backlog_waiting(self) -> bool:
        """A connection waits in a listener's backlog (a listening socket reads ready)."""
        import select

        fds = self.proxy.listen_fds if self.proxy else []
        try:
            return bool(fds) and bool(select.select(fds, [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def _start_proxy(self, *, restart: bool) -> None:
        assert self.proxy is not None
        w = self.proxy.start()
        self.sel.register(w.channel.fileno(), selectors.EVENT_READ, ("proxy", w))
        # A pidfd, not multiprocess's sentinel: the worker closes every inherited
        # descriptor, the sentinel pipe's write end included.
        w.pidfd = os.pidfd_open(w.pid)
        self.sel.register(w.pidfd, selectors.EVENT_READ, ("proxy-exit", w))
        if restart:
            self.counters.proxy_restarts += 1
        self.emit(make_event(
            "worker-restarted" if restart else "worker-started",
            f"proxy worker {'restarted' if restart else 'started'} "
            f"(pid {w.pid}, incarnation {w.incarnation})",
            level="warning" if restart else "info",
            category=["process"], type=["start"], outcome="success",
            process={"pid": w.pid, "name": "agentpen-proxy"},
            agentpen={"role": "proxy", "incarnation": w.incarnation,
                      "restart_count": self.counters.proxy_restarts},
        ), durable=restart)
        if restart:
            self.log.warning("proxy worker restarted", pid=w.pid, restarts=self.counters.proxy_restarts)
        if not self.audit.healthy:
            with contextlib.suppress(OSError):  # a worker dead at birth is seen by its pidfd
                w.channel.send(MsgType.CONTROL, {"op": "deny-new"})

    def _on_proxy_readable(self, w: Any) -> bool:
        """Handle one message; False once the channel is closed."""
        msg = self._recv(w.channel, "proxy")
        if msg is None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(w.channel.fileno())
            return False
        msg.close_fds()
        if msg.sender_pid not in (w.pid, None):
            self.counters.protocol_violations += 1
            return True
        if msg.type == MsgType.EVENT:
            body = dict(msg.body)
            ack_id = body.pop("ack_id", None)
            types = body.get("event", {}).get("type", [])
            if "denied" in types:
                self.counters.connections_denied += 1
            elif "allowed" in types:
                self.counters.connections_allowed += 1
            if body.get("agentpen", {}).get("would_block"):
                name = str(body.get("tls", {}).get("client", {}).get("server_name") or "")
                if name:
                    self.learned[name] = self.learned.get(name, 0) + 1
            self.emit(body, sender="proxy", pid=msg.sender_pid)
            if ack_id is not None:
                with contextlib.suppress(OSError):
                    w.channel.send(MsgType.ACK, {"ack_id": ack_id, "ok": bool(self.audit.healthy)})
        elif msg.type == MsgType.STATUS and msg.body.get("state") == "failed":
            # The worker refused to start (bad policy, sockets, seccomp): say why, since
            # otherwise it only looks like a crash loop.
            err = str(msg.body.get("error"))
            self.emit(make_event(
                "worker-error", f"proxy worker refused to start: {err}", level="error",
                category=["process"], type=["error"], outcome="failure",
                error={"message": err}, agentpen={"role": "proxy", "incarnation": w.incarnation},
            ), durable=True)
            self.log.error("proxy worker refused to start", error=err)
        return True

    def _on_proxy_exit(self, w: Any) -> None:
        assert self.proxy is not None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(w.pidfd)
        os.close(w.pidfd)
        # Drain what the worker said before dying (its last events).
        os.set_blocking(w.channel.fileno(), False)
        for _ in range(10000):
            try:
                if not self._on_proxy_readable(w):
                    break
            except BlockingIOError:
                break
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(w.channel.fileno())
        code, sig, loop = self.proxy.on_exit(time.monotonic())
        how = f"signal {signal.Signals(sig).name}" if sig else f"status {code}"
        self.emit(make_event(
            "worker-exited", f"proxy worker exited ({how})",
            level="info" if self.done else "error",
            category=["process"], type=["end"], outcome="failure" if (sig or code) else "success",
            process={"pid": w.pid, "name": "agentpen-proxy", "exit_code": code},
            agentpen={"role": "proxy", "signal": signal.Signals(sig).name if sig else None,
                      "incarnation": w.incarnation},
        ), durable=True)
        if loop:
            self.emit(make_event(
                "egress-stopped", "proxy crash loop: egress stopped for the rest of the session",
                level="critical", category=["network", "process"], type=["denied"], outcome="success",
                reason="crash-loop", agentpen={"exits_in_window": len(self.proxy.exits)},
            ), durable=True)
            self.log.error("proxy worker keeps crashing: egress is stopped for good; "
                           "the command keeps running without network")

    # -- end -------------------------------------------------------------------------------

    def _teardown(self) -> None:
        # The proxy stops once the sandbox is gone: then no new connection can start, and
        # every hello still unjudged is already in its sockets; it judges those, and the
        # drain below records them and ACKs decisions. Gone means the jail was reaped (its
        # pid namespace is empty), or else pasta has exited (_end_netns).
        proxy_told = self.sandbox_gone and self._tell_proxy_to_stop()
        if self.sandbox_gone:
            # Nothing runs in the sandbox: pasta may go now, and its exit (10-20 ms here)
            # overlaps the proxy's last verdicts and the project's clean-up.
            if self.netns:
                self.netns.end_holder()
            self._stop_proxy(proxy_told)
            self._sandbox_dead(2.0)  # reaped by bwrap: at once
            self._clean_project()
            self._end_netns()
        else:  # the command may still run: pasta and the worker go down first
            self._end_netns()
            self._sandbox_dead(2.0)
            self._stop_proxy(proxy_told)
            self._clean_project()
        if self.netns:  # a child pasta forked during setup may outlive pasta itself
            with contextlib.suppress(OSError):
                os.killpg(self.netns.pasta.pid, signal.SIGKILL)
        if self.pasta_pidfd >= 0:
            os.close(self.pasta_pidfd)
            self.pasta_pidfd = -1
        guardian = self.guardian or (self.netns.guardian if self.netns else None)
        if guardian is not None:  # everything is cleaned up: it must not act on a reused pgid
            guardian.release()
        self._restore_terminal()

    def _pin(self, what: str, pid: int | None) -> None:
        """A pidfd for a process of the sandbox, so that the teardown can make sure it is
        gone (and kill it) without ever signalling a reused pid."""
        if pid is None or what in self.pins:
            return
        with contextlib.suppress(OSError):
            self.pins[what] = os.pidfd_open(pid)

    def _sandbox_dead(self, timeout: float) -> None:
        """Before the project is cleaned: the jail and the sandbox's init are gone. They
        die with the netns worker and with pasta's holder (its pid namespace), which the
        teardown has ended; a straggler is waited for, then killed."""
        import select

        for what, fd in list(self.pins.items()):
            try:
                if not select.select([fd], [], [], timeout)[0]:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    select.select([fd], [], [], timeout)
            except OSError:
                pass
            finally:
                os.close(fd)
                del self.pins[what]

    def _end_netns(self) -> None:
        if not self.netns:
            return
        # A worker we forked exits after its last report; then the holder's end, and
        # pasta exits with its holder (workers/netns/join.py).
        if self.netns.forked is not None:
            self.netns.reap_worker(TEARDOWN_TIMEOUT if self.outcome.error is None else 0.5)
        # An unfinished cross-check ends with the session; and a verifier that has not yet
        # closed what it inherited (it runs at nice 19) must not keep the holder's socket.
        self.netns.end_verifier()
        self.netns.end_holder()
        try:
            self.netns.pasta.wait(TEARDOWN_TIMEOUT if self.outcome.error is None else 0.5)
        except Exception:
            self.netns.kill()
            with contextlib.suppress(Exception):
                self.netns.pasta.wait(TEARDOWN_TIMEOUT)
        self._drain(self.netns.channel, self._on_netns_readable, 2.0)
        self._drain_pasta_stderr()
        self.netns.channel.close()

    def _stop_proxy(self, told: bool) -> None:
        if not self.proxy:
            return
        self.proxy_start_at = None
        for fd in self.proxy.listen_fds:  # watched until the first proxy starts
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
        if not self.proxy.incarnations and not self.proxy.failed_closed and self._backlog_waiting():
            # The command ended before the proxy started, leaving connections behind: they
            # get their verdicts (audited) like any other; then the proxy stops.
            self._start_first_proxy()
            told = False
        cur = self.proxy.current
        if cur is not None:  # its last decisions and connection summaries
            if not told:
                self._tell_proxy_to_stop()
            self._drain(cur.channel, lambda: self._on_proxy_readable(cur), 3.0)
        self.proxy.stop()
        self.proxy.fail_closed()  # closes our copies of the listening sockets

    def _clean_project(self) -> None:
        self._remove_placeholders()
        self._discard_scratch()
        self._quarantine_git_redirections()

    def _tell_proxy_to_stop(self) -> bool:
        if self.proxy and self.proxy.current:
            with contextlib.suppress(OSError):
                self.proxy.current.channel.send(MsgType.CONTROL, {"op": "shutdown"})
        return True

    def _drain(self, ch: Channel, handle, timeout: float) -> None:
        """Read a worker's channel until EOF (bounded): nothing it said is lost at exit."""
        import select

        if ch.sock.fileno() < 0:
            return
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            os.set_blocking(ch.fileno(), False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                ready, _, _ = select.select([ch.fileno()], [], [], left)
            except (OSError, ValueError):
                return
            if not ready:
                return
            try:
                if not handle():
                    return
            except BlockingIOError:
                continue
            except OSError:
                return

    def _drain_pasta_stderr(self) -> None:
        """What pasta (and the netns worker) said last, without ever blocking: a process
        still holding the pipe must not hang the teardown."""
        assert self.netns is not None
        err = self.netns.pasta.stderr
        if err is None:
            return
        rest = b""
        with contextlib.suppress(OSError):
            os.set_blocking(err.fileno(), False)
            for _ in range(64):
                chunk = os.read(err.fileno(), 65536)
                if not chunk:
                    break
                rest += chunk
        bodies = (self.pasta_log.feed(rest) if rest and self.pasta_log else [])
        bodies += self.pasta_log.finish() if self.pasta_log else []
        for body in bodies:
            self.emit(body, sender="pasta", pid=self.netns.pasta.pid)
        with contextlib.suppress(OSError):
            err.close()

    def _quarantine_git_redirections(self) -> None:
        """See supervisor/persistence.py: what the host's git would run, planted this session."""
        if self.go_ns is None:
            return  # the sandbox never ran
        from agentpen.supervisor.persistence import scan_and_quarantine

        findings, complete = scan_and_quarantine(self.policy.project, self.go_ns)
        for f in findings:
            done = f.quarantined_to is not None
            self.emit(make_event(
                "persistence-quarantined",
                f"{f.path}: {f.why}; " + (f"renamed to {f.quarantined_to}" if done
                                          else f"could not be renamed: {f.error}"),
                level="warning" if done else "error", category=["file", "intrusion_detection"],
                type=["change"] if done else ["error"], outcome="success" if done else "failure",
                reason=f.why,
                agentpen={"path": f.path, "quarantined_to": f.quarantined_to, "error": f.error},
            ), durable=True)
            self.log.warning("planted git redirection quarantined" if done else
                             "planted git redirection could NOT be quarantined: do not run git here",
                             path=f.path, moved_to=f.quarantined_to, why=f.why)
        if not complete:
            self.emit(make_event(
                "persistence-scan-incomplete", "the project was too large to scan for planted git "
                "redirections in time", level="warning", category=["file"], type=["info"],
                outcome="failure", agentpen={"project": self.policy.project},
            ))
            self.log.warning("scan for planted git redirections incomplete", project=self.policy.project)

    def _remove_placeholders(self) -> None:
        from agentpen.workers.jail.protect import remove_placeholders

        covers = getattr(self, "covers", [])
        if not any(c.placeholder for c in covers):
            return
        left = remove_placeholders(covers)
        if left:
            self.emit(make_event(
                "placeholders-left", f"could not remove {len(left)} protection placeholder(s) "
                "from the project", level="warning", category=["file"], type=["deletion"],
                outcome="failure", agentpen={"paths": left},
            ))
            self.log.warning("protection placeholders left in the project", paths=left)

    def _discard_scratch(self) -> None:
        """Report what the command wrote under scratch covers, then delete it: the
        agent's own state for this run only, never the project's."""
        import shutil

        from agentpen.workers.jail.protect import scratch_contents

        if self.scratch_root is None:
            return
        entries, truncated = scratch_contents(self.covers)
        if entries:
            shown = [path for path, _ in entries[:100]]
            rels = sorted({c.rel for c in self.covers if c.kind == "scratch"
                           and any(e.startswith(c.path + "/") for e in shown)})
            self.emit(make_event(
                "protected-writes-discarded",
                f"discarded {len(entries)}{'+' if truncated else ''} file(s) the command wrote "
                f"under protected {', '.join(rels)}", level="warning", category=["file"],
                type=["deletion"], outcome="success", reason="protected path: would run on the host",
                agentpen={"paths": shown, "files": len(entries), "truncated": truncated,
                          "bytes": sum(size for _, size in entries), "protected": rels},
            ))
            self.log.warning("discarded what the command wrote under protected paths "
                             "(--unprotect PATH keeps such writes)", paths=shown[:10], files=len(entries))
        shutil.rmtree(self.scratch_root, ignore_errors=True)
        self.scratch_root = None

    def _restore_terminal(self) -> None:
        """The sandbox was the terminal's foreground group; give it back to ours."""
        with contextlib.suppress(OSError):
            if os.isatty(0):
                os.tcsetpgrp(0, os.getpgrp())

    def _finish(self) -> int:
        o = self.outcome
        status = o.status()
        duration = int((time.monotonic() - self.started) * 1e9)
        msg = f"session ended: exit status {status}"
        if o.error:
            msg += f" ({o.error})"
        self.emit(make_event(
            "session-ended", msg, level="error" if o.error else "info",
            category=["process", "session"], type=["end"],
            outcome="failure" if o.error else "success", reason=o.error,
            event={"duration": duration},
            process={"exit_code": status, "name": os.path.basename(self.policy.command[0])},
            agentpen={"counters": {**self.counters.__dict__.copy(), "audit": self.audit.counters},
                      "signal": signal.Signals(o.signal).name if o.signal else None,
                      "fix": o.fix},
        ), durable=True)
        return status


def _collect_garbage_again() -> None:
    """The cyclic collector, off during the start-up (cli._main), on again; what the
    start-up built is frozen first: kept for good, never traversed (nor written to in a
    forked proxy's copy-on-write memory)."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def start_pasta(net: SessionPolicy | Doors) -> NetnsWorker:
    """Start pasta and the netns worker; the CLI calls it as early as it can, with the
    doors alone (then NetnsWorker.configure() once the policy is resolved)."""
    try:
        return NetnsWorker.spawn(net)
    except Exception as exc:
        raise SetupFailed(str(getattr(exc, "what", exc)), fix=getattr(exc, "how_to_fix", None)) from None


def _children(pid: int) -> list[int]:
    """Host pids of a process's children (pid namespaces make reported pids local)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))

