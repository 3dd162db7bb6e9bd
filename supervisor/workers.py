"""Spawning and watching the workers: pasta + the netns worker (and through it the
jail), and the proxy worker with its restart policy.

The supervisor never parses bytes from the sandbox; it only reads framed messages
from its own workers, checks who sent them (SCM_CREDENTIALS) and acts on them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

from agentpen.core.channel import Channel, MsgType, channel_pair
from agentpen.core.policy import Doors, SessionPolicy
from agentpen.core.record import field, record

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

# Crash loop: this many proxy exits within the window stops egress for good.
CRASH_LOOP_COUNT = 5
CRASH_LOOP_WINDOW = 30.0
# Backoff before restart n (1-based) within the window: immediate first, then doubling.
RESTART_BACKOFF = (0.0, 0.05, 0.1, 0.2, 0.4)


class _Preload:
    """Imports in a daemon thread while the supervisor waits (issue 10).

    ``multiprocess`` (~30 ms here) is needed to fork the proxy worker, and the FDS
    message that asks for the fork arrives just before "verified": imported on
    demand, it delays the "go" that starts the command. ``after_fork`` modules
    (the proxy server: uvloop, pyseccomp) are imported once the first proxy runs,
    so that a restart forks from an initialised supervisor (crash to first accept).
    ``join()`` before every fork: no thread may hold the import lock across it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self, *modules: str) -> None:
        self.join()

        def run() -> None:
            import importlib

            for name in modules:
                with contextlib.suppress(Exception):  # imported again, and reported, at use
                    importlib.import_module(name)

        self._thread = threading.Thread(target=run, name="agentpen-preload", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


PRELOAD = _Preload()


def minimal_env() -> dict[str, str]:
    """What pasta and the netns worker get: nothing of the user's environment (the
    sandbox's own environment travels in the policy, over the channel)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}


class _PidfdPopen(subprocess.Popen):
    """Popen whose ``wait(timeout)`` sleeps on a pidfd instead of polling.

    CPython's POSIX ``wait(timeout)`` polls waitpid with sleeps doubling up to 50 ms,
    which adds 5-30 ms to the session's end (pasta exits ~10 ms after its child). The
    object is the one ``spawn_pasta`` made (its class swapped: no new state)."""

    def _wait(self, timeout):  # type: ignore[no-untyped-def]
        if self.returncode is None and timeout is not None and timeout > 0:
            import select

            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError:
                pidfd = -1  # already reaped or no pidfd: CPython's own loop below
            if pidfd >= 0:
                try:
                    poller = select.poll()
                    poller.register(pidfd, select.POLLIN)
                    poller.poll(max(0, int(timeout * 1000)))
                finally:
                    os.close(pidfd)
                if self.poll() is None:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                return self.returncode
        return super()._wait(timeout)


@record
class NetnsWorker:
    pasta: subprocess.Popen[bytes]
    channel: Channel
    guardian: Any = None  # supervisor/guardian.Guardian: forked before pasta, knows its pid
    pid: int | None = None  # the netns worker's pid, from HELLO checked against SCM_CREDENTIALS
    handed_over: bool = False  # started early by the CLI, now owned by a Session
    forked: int | None = None  # pid of a worker forked by us (None: pasta started it)
    holder: socket.socket | None = None  # our end of the holder's socket: closing it ends pasta

    doors: Doors | None = None  # what pasta was started with (configure() checks the policy's)
    verifier: int | None = None  # pid of the pyroute2 verifier we forked

    @classmethod
    def spawn(cls, net: SessionPolicy | Doors, pasta_path: str = "pasta") -> NetnsWorker:
        """pasta, and the netns worker in its namespaces. Given the session's policy,
        the worker is configured at once; given only the doors (the CLI, before the
        policy is resolved), ``configure()`` follows.

        Forked (the default, when this process is single-threaded): pasta runs a
        *holder* (workers/netns/join.py) and a fork of this already-initialised process
        joins the holder's namespaces: no interpreter start, no imports on the path to
        the command (issue 10). Otherwise pasta runs ``python -m agentpen.workers.netns``.
        Both start the same worker code at HELLO, with the same checks."""
        from agentpen.supervisor.guardian import Guardian
        from agentpen.workers.netns.pasta import detect_features, pasta_argv, spawn_pasta

        doors = net.doors() if isinstance(net, SessionPolicy) else net

        # The verifier's socket pair now, its fork right after pasta's: forking a 30 MB
        # interpreter costs the parent copy-on-write faults, better paid while pasta
        # builds the namespace than before pasta is started.
        pair = _verifier_pair()  # None unless single-threaded: then no fork at all
        verifier = pair[0] if pair else None
        features = detect_features(pasta_path)
        sup, wk = channel_pair()
        # The command keeps the user's terminal: hand duplicates of 0/1/2 to the worker
        # (through pasta, when pasta starts it: pasta's own stdio is /dev/null and a pipe).
        stdio = [os.dup(fd) for fd in (0, 1, 2)]
        extra = []
        holder = ours = None
        if verifier is not None and os.environ.get("AGENTPEN_NETNS_WORKER") != "exec":
            from agentpen.workers.netns.join import holder_argv

            ours, holder = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the holder's pid, by the kernel
            inner = holder_argv()
            passed = []
        else:
            inner = [
                sys.executable, "-I", "-m", "agentpen.workers.netns",
                "--channel-fd", str(wk.fileno()), "--stdio", ",".join(map(str, stdio)),
            ]
            if verifier is not None:
                inner += ["--verifier-fd", str(verifier.fileno())]
                extra.append(verifier.fileno())
            passed = [wk.fileno(), *stdio, *extra]
        # Before pasta exists: a supervisor SIGKILLed at any point after this leaves the
        # guardian to kill pasta's group (pasta's pre-exec child outlives its PDEATHSIG).
        guardian = Guardian()
        forked = verifier_pid = None
        try:
            proc = spawn_pasta(
                pasta_argv(net, inner, features),
                pass_fds=passed,
                env=minimal_env(),
                stdin=holder.fileno() if holder is not None else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                announce=guardian.announce_self,
            )
            try:
                if holder is not None:
                    holder.close()  # pasta's and the holder's copies are the ones that count
                    forked = _fork_netns_worker(wk, stdio, verifier, ours, proc.pid,  # type: ignore[arg-type]
                                                doors)
                if pair:  # a dead verifier fails closed
                    verifier_pid = _fork_verifier(pair[1], cross_check=holder is not None)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                for pid in (forked, verifier_pid):
                    if pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                raise
        except BaseException:
            guardian.release()  # pasta never ran (or is reaped): nothing to guard
            for pid in (forked, verifier_pid):
                if pid:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
            if ours is not None:
                ours.close()
            raise
        finally:
            wk.close()
            if pair:
                for sock in pair:  # the worker's and the verifier's copies are the only ones left
                    sock.close()
            for fd in stdio:
                os.close(fd)
        os.set_blocking(proc.stderr.fileno(), False)  # type: ignore[union-attr]
        if type(proc) is subprocess.Popen:
            proc.__class__ = _PidfdPopen
        worker = cls(proc, sup, guardian, forked=forked, holder=ours, doors=doors, verifier=verifier_pid)
        if isinstance(net, SessionPolicy):
            worker.configure(net)
        # (multiprocess is imported when the first proxy is forked, after "go": a preload
        # thread now would only take the GIL from this thread's own start-up work.)
        return worker

    def configure(self, policy: SessionPolicy) -> None:
        """CONFIG, as early as the policy is known. A forked worker has set the namespace
        up from the doors already and checks that CONFIG describes it; one started by
        pasta sets it up now, while we open the audit stream. The persistence covers
        follow with "go"."""
        from agentpen.supervisor.errors import SetupFailed

        if policy.doors() != self.doors:  # pasta's command line was built from these
            raise SetupFailed(f"the session's doors {policy.doors()} are not pasta's {self.doors}")
        try:
            self.channel.send(MsgType.CONFIG, {"policy": policy.to_json()})
        except OSError as exc:
            raise SetupFailed(f"the netns worker went away before the session started ({exc})",
                              fix="run agentpen again; if it recurs, run agentpen --check") from None

    def kill(self) -> None:
        if self.pasta.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pasta.pid, signal.SIGKILL)
        if self.forked is not None:  # in pasta's group too, unless it died before joining
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.forked, signal.SIGKILL)

    def end_holder(self) -> None:
        """Our end of the holder's socket closed: the holder reads EOF and exits, and
        pasta with it. (Before that pasta has no reason to exit: its child lives.)"""
        if self.holder is not None:
            self.holder.close()
            self.holder = None

    def reap_worker(self, timeout: float) -> int | None:
        """Wait (bounded) for a forked worker's exit; its wait status, or None."""
        if self.forked is None:
            return None
        if not _exited_within(self.forked, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.forked, signal.SIGKILL)
        try:
            _, status = os.waitpid(self.forked, 0)
        except ChildProcessError:
            status = None
        self.forked = None
        return status

    def end_verifier(self) -> None:
        """Its answer is read or no longer wanted: kill (a no-op once it exited) and reap."""
        if self.verifier is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.verifier, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.verifier, 0)
        self.verifier = None

    def abandon(self) -> None:
        """The session never started: pasta's group down and reaped, the guardian let go."""
        self.kill()
        self.end_holder()
        with contextlib.suppress(Exception):
            self.pasta.wait(5)
        self.reap_worker(1.0)
        self.end_verifier()
        if self.guardian is not None:
            self.guardian.release()


def _fork_netns_worker(wk: Channel, stdio: list[int], verifier: socket.socket,
                       holder: socket.socket, pasta_pid: int, doors: Doors) -> int:
    """Fork the netns worker (workers/netns/main.forked_main). Call single-threaded.
    ``doors``: pasta's, from which the worker sets the namespace up before CONFIG."""
    for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
        with contextlib.suppress(Exception):
            stream.flush()
    parent = os.getpid()
    env = minimal_env()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from agentpen.workers.netns.main import forked_main

            code = forked_main(wk.fileno(), stdio, verifier.fileno(), holder.fileno(), pasta_pid,
                               parent, env, doors)
        finally:
            os._exit(code)
    return pid


def _verifier_pair() -> tuple[socket.socket, socket.socket] | None:
    """(the netns worker's end, the verifier's end), or None when another thread runs:
    forking then could copy a held lock, so the worker forks its own verifier."""
    if threading.active_count() != 1:
        return None
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _fork_verifier(theirs: socket.socket, *, cross_check: bool) -> int:
    """Fork the process that reads the sandbox's network with pyroute2 (issue 10); its pid.

    It receives a NETLINK_ROUTE socket that the worker creates inside the namespace
    (workers/netns/main.RemoteVerifier) and answers one line. As the gate of a
    pasta-started worker it imports pyroute2 (120-330 ms here, at nice 19) while pasta
    builds the namespace and the worker starts. As the ``cross_check`` of a forked
    worker it waits, idle, for the socket, which comes CROSSCHECK_AFTER the jail
    started: even at nice 19 the import slowed the command's start by ~20 ms. Our
    child, killed and reaped at teardown (an unfinished cross-check must not outlive
    the session), and dead with us (PDEATHSIG). Every descriptor but its socket is
    closed, stdio goes to /dev/null. Call while single-threaded (see _verifier_pair)."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            # Lowest priority first: even its own imports must not take a core from the
            # supervisor, pasta or the worker while they start.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, 19)
            from agentpen.core.osutil import close_fds_except, set_name, set_pdeathsig

            set_pdeathsig(signal.SIGKILL, expected_parent=parent)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            close_fds_except({theirs.fileno()})
            with contextlib.suppress(OSError):
                set_name(b"agentpen-verify")
            if cross_check:  # not one import before the socket (or EOF) arrives
                import select

                select.select([theirs], [], [])
            from agentpen.workers.netns.main import serve_remote_verifier

            serve_remote_verifier(theirs.fileno())
        finally:
            os._exit(0)
    return pid


def _proxy_entry(channel_fd: int, listen_fds: list[int], policy_json: dict, incarnation: int,
                 parent_pid: int | None = None) -> None:
    """First code of a forked proxy worker (runs in the child)."""
    # Nothing of the supervisor's stays open while the server module is imported (tens of
    # ms): a copy of, say, pasta's holder socket would keep pasta up after the session.
    from agentpen.core.osutil import close_fds_except, replace_environment, set_name

    with contextlib.suppress(OSError):
        set_name(b"agentpen-proxy")  # ps and the benches tell it from the supervisor
    close_fds_except([channel_fd, *listen_fds])
    # It parses attacker bytes: none of the user's environment (tokens, keys) in it.
    replace_environment(minimal_env())
    # The supervisor blocks its signals for its signalfd; a worker starts clean.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    from agentpen.workers.proxy.server import proxy_main

    proxy_main(channel_fd, listen_fds, policy_json, incarnation, parent_pid=parent_pid)


@record
class ProxyWorker:
    process: object  # multiprocess.Process
    channel: Channel
    incarnation: int
    started: float
    pid: int
    pidfd: int = -1


@record
class ProxySupervisor:
    """Owns the listening sockets for the whole session and hands them to each
    proxy incarnation; connections that arrive while none runs wait in the backlog."""

    listen_fds: list[int]
    policy: SessionPolicy
    current: ProxyWorker | None = None
    incarnations: int = 0
    exits: deque[float] = field(default_factory=deque)
    failed_closed: bool = False
    restart_at: float | None = None

    def start(self) -> ProxyWorker:
        PRELOAD.join()  # never fork while another thread may hold the import lock
        import multiprocess

        ctx = multiprocess.get_context("fork")
        sup, wk = channel_pair()
        self.incarnations += 1
        proc = ctx.Process(
            target=_proxy_entry,
            args=(wk.fileno(), list(self.listen_fds), self.policy.to_json(), self.incarnations,
                  os.getpid()),
            name=f"agentpen-proxy-{self.incarnations}",
            daemon=False,
        )
        proc.start()
        wk.close()
        self.current = ProxyWorker(proc, sup, self.incarnations, time.monotonic(), proc.pid)
        self.restart_at = None
        return self.current

    def warm(self) -> None:
        """Import the proxy's modules (uvloop, libseccomp) here, in a daemon thread, so
        that a restart forks a worker that has them (crash to first accept). Called once
        the command has run a while (Session): earlier, the thread would take the GIL
        from the session's start and a short session's end."""
        PRELOAD.start("agentpen.workers.proxy.server")

    def on_exit(self, now: float) -> tuple[int | None, int | None, bool]:
        """The current worker exited. Returns (exit code, signal, crash loop?)."""
        assert self.current is not None
        proc = self.current.process
        proc.join(1.0)  # type: ignore[attr-defined]  # the pidfd said it exited: reap it
        code = proc.exitcode  # type: ignore[attr-defined]
        self.current.channel.close()
        self.current = None
        self.exits.append(now)
        while self.exits and now - self.exits[0] > CRASH_LOOP_WINDOW:
            self.exits.popleft()
        if len(self.exits) >= CRASH_LOOP_COUNT:
            self.fail_closed()
            return (*_split_status(code), True)
        delay = RESTART_BACKOFF[min(len(self.exits), len(RESTART_BACKOFF)) - 1]
        self.restart_at = now + delay
        return (*_split_status(code), False)

    def fail_closed(self) -> None:
        """Egress stops for good: close the listening sockets so connections are
        refused at once rather than hang in a backlog nobody serves."""
        self.failed_closed = True
        self.restart_at = None
        for fd in self.listen_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.listen_fds = []

    def stop(self, timeout: float = 2.0) -> None:
        from agentpen.core.channel import MsgType

        cur = self.current
        if cur is None:
            return
        with contextlib.suppress(OSError):
            cur.channel.send(MsgType.CONTROL, {"op": "shutdown"})
        # Not process.join(timeout): the worker closes every inherited descriptor, the
        # sentinel pipe's write end included, so multiprocess sees the sentinel ready at
        # once and falls into a blocking waitpid -- a worker that ignored "shutdown"
        # would hang the teardown. A pidfd keeps the timeout real.
        if not _exited_within(cur.pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(cur.pid, signal.SIGKILL)
        cur.process.join()  # type: ignore[attr-defined]  # exited or SIGKILLed: reaps at once
        cur.channel.close()
        self.current = None


def _exited_within(pid: int, timeout: float) -> bool:
    """True once `pid` (our unreaped child) has exited, waiting up to `timeout` s."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(pidfd)


def _split_status(code: int | None) -> tuple[int | None, int | None]:
    if code is None:
        return None, None
    if code < 0:
        return None, -code
    return code, None
