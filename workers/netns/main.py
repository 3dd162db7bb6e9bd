"""The netns worker process, in the sandbox's fresh user and network namespace (pasta's),
where it is root of that user namespace. Two ways in: forked by the supervisor and
joined to pasta's namespaces (``forked_main``, the default: docs/netns.md), or started
by pasta as its command (``main``, the fallback).

Order (each step reported to the supervisor, any failure ends the session before
the command runs):
  1. HELLO;
  2. load the nftables ruleset and read it back; verify links, addresses and routes
     (nothing but loopback): the stdlib rtnetlink gate, with pyroute2's cross-check
     once the jail runs (forked), or pyroute2 as the gate (started by pasta);
  3. create the proxy's listening sockets (127.0.0.1:443, [::1]:443) and the DNS
     sockets (port 53) -- both need privilege in this namespace -- and send the
     proxy's up to the supervisor (SCM_RIGHTS);
  4. drop every capability and prove it from /proc/self/status;
  5. receive the session policy (CONFIG) -- never from argv or env -- and report
     "verified". Steps 2-4 need only the doors and the user's uid and gid: the forked
     worker, which knows them from the fork, does them before CONFIG arrives and then
     requires CONFIG to describe that namespace; the pasta-started one waits for CONFIG
     first (issue 10);
  6. wait for the supervisor's "go" (the session start is on disk), fork the jail
     worker, which execs bwrap around the command;
  7. serve DNS for the allowlist, relay bwrap's JSON status (pids, exit code) and
     report the command's exit.

Start-up (issue 10, docs/performance.md): importing pyroute2 costs 120-300 ms of CPU,
more than everything else the worker does before "verified". The pasta-started worker,
whose gate it is, has it imported by a verifier process (the supervisor's, or its own
child) on the other core while it starts, and asks for the dump after the nft read-back;
any doubt (no answer, a crash, garbage) fails closed. The forked worker's verifier waits,
idle, until CROSSCHECK_AFTER the jail started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

    from agentpen.core.channel import Channel
    from agentpen.core.policy import Doors, SessionPolicy


def _load() -> None:
    """The worker's own imports, after the verifier child is forked (main()): the
    child starts importing pyroute2 some 20 ms after exec instead of ~100 ms."""
    global osutil, MsgType, make_event, Channel, SessionPolicy, selectors
    import selectors

    from agentpen.core import osutil
    from agentpen.core.channel import Channel, MsgType
    from agentpen.core.events import make_event
    from agentpen.core.policy import SessionPolicy


def _traceback() -> str:
    import traceback  # only on failure: ~1.5 ms (textwrap) off the worker's start-up

    return traceback.format_exc(limit=8)


class _Fatal(Exception):
    def __init__(self, what: str, fix: str | None = None) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix


def _step(ch: Channel, name: str, message: str, t0: float, **fields: object) -> None:
    ch.send(MsgType.EVENT, make_event(
        "setup-step", message, category=["configuration"], type=["creation"], outcome="success",
        event={"duration": int((time.monotonic() - t0) * 1e9)},
        agentpen={"step": name, **fields},
    ))


def _wait_for(ch: Channel, mtype: MsgType) -> dict:
    while True:
        msg = ch.recv()
        if msg is None:
            raise _Fatal("the supervisor went away")
        msg.close_fds()
        if msg.type == mtype:
            return msg.body
        if msg.type == MsgType.CONTROL and msg.body.get("op") == "shutdown":
            raise _Fatal("shut down by the supervisor before the command started")


class Verifier:
    """pyroute2 verification in a forked child (see the module docstring).

    ``start()`` forks before the worker has threads or opened anything but its
    inherited descriptors; the child keeps only its two pipes, imports pyroute2, waits
    for ``dump()``, runs ``verify.verify_closed_namespace()`` and writes one JSON
    line: ``{"state": ...}`` or ``{"error": what, "fix": how}``. ``result()`` reaps it
    and returns the state or raises ``_Fatal``."""

    def __init__(self, pid: int, go_w: int, res_r: int) -> None:
        self.pid, self.go_w, self.res_r = pid, go_w, res_r
        self.reaped = False

    @classmethod
    def start(cls) -> Verifier:
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        res_r, res_w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the verifier child: never returns
            code = 1
            try:
                for name in os.listdir("/proc/self/fd"):  # keep stdio (pasta's) and our pipes
                    if int(name) not in (0, 1, 2, go_r, res_w):
                        with contextlib.suppress(OSError):
                            os.close(int(name))
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
                if os.getppid() != parent:
                    os._exit(1)
                from agentpen.workers.netns import verify
                from agentpen.workers.netns.errors import NetnsSetupError

                with contextlib.suppress(ImportError):  # reported by the check: fail closed
                    import pyroute2  # noqa: F401  # the cost we are here to pay early
                if os.read(go_r, 1) != b"v":
                    os._exit(1)  # the worker gave up: nothing to verify
                try:
                    out: dict = {"state": verify.verify_closed_namespace()}
                except NetnsSetupError as exc:
                    out = {"error": exc.what, "fix": exc.how_to_fix}
                except Exception as exc:  # reported, never swallowed: fail closed
                    out = {"error": f"verification failed: {type(exc).__name__}: {exc}"}
                data = (json.dumps(out) + "\n").encode()
                while data:
                    data = data[os.write(res_w, data):]
                code = 0
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(res_w)
        return cls(pid, go_w, res_r)

    def dump(self) -> None:
        """Tell the child to read links, addresses and routes now."""
        with contextlib.suppress(OSError):  # the child is gone: result() reports it
            os.write(self.go_w, b"v")
        os.close(self.go_w)
        self.go_w = -1

    def result(self) -> dict:
        data = b""
        try:
            while chunk := os.read(self.res_r, 65536):
                data += chunk
        finally:
            os.close(self.res_r)
            self.res_r = -1
            _, status = os.waitpid(self.pid, 0)
            self.reaped = True
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            raise _Fatal(f"the namespace verifier died ({_wait_text(status)}) before reporting")
        return _verifier_result(data)

    def abandon(self) -> None:
        """Setup failed elsewhere: end the child and reap it."""
        if self.go_w >= 0:
            os.close(self.go_w)  # EOF: the child exits without dumping
            self.go_w = -1
        if self.res_r >= 0:
            os.close(self.res_r)
            self.res_r = -1
        if self.reaped:
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.reaped = True


def _verifier_result(data: bytes) -> dict:
    """The verified state from a verifier's one JSON line, or _Fatal (fail closed)."""
    if not data:
        raise _Fatal("the namespace verifier ended without reporting")
    try:
        out = json.loads(data)
    except ValueError:
        raise _Fatal("the namespace verifier sent an unreadable result") from None
    if not isinstance(out, dict) or ("state" in out) == ("error" in out):
        raise _Fatal("the namespace verifier sent an unexpected result")
    if "error" in out:
        raise _Fatal(str(out["error"]), out.get("fix"))
    state = out["state"]
    if not isinstance(state, dict) or state.get("closed") is not True:
        raise _Fatal("the namespace verifier did not report a closed namespace")
    return state


class RemoteVerifier:
    """pyroute2 verification by a process the supervisor forked before it started pasta
    (supervisor/workers.py), so that pyroute2's import overlaps pasta's start and this
    worker's own start-up instead of following them.

    ``dump()`` creates a NETLINK_ROUTE socket here, in the sandbox's namespace, and
    passes it over the verifier socket (SCM_RIGHTS): netlink answers for the namespace
    a socket was created in, whoever holds it. The verifier runs the same pyroute2 dump
    and ``verify.check_state()`` on it and answers one JSON line (``serve_remote_verifier``).
    Same point of the order as before (after nft), same check, fail closed."""

    def __init__(self, fd: int) -> None:
        import socket

        self.sock: Any = socket.socket(fileno=fd)

    def dump(self) -> None:
        _send_netlink_socket(self.sock)  # the verifier gone: result() reports it

    def result(self) -> dict:
        data = b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except OSError as exc:
            raise _Fatal(f"the namespace verifier could not be read: {exc}") from None
        finally:
            self.abandon()
        return _verifier_result(data)

    def abandon(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _send_netlink_socket(sock: Any) -> None:
    """A NETLINK_ROUTE socket of this namespace to the verifier, which dumps through it."""
    import socket

    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    try:
        socket.send_fds(sock, [b"v"], [nl.fileno()])
    except OSError:
        pass  # the verifier is gone: its answer (EOF) says so, and fails closed
    finally:
        nl.close()


def pyroute2_state(fd: int) -> dict:
    """verify_closed_namespace() over a given NETLINK_ROUTE socket (SOCK_DGRAM: what
    pyroute2 0.9 accepts for fileno=): links, addresses, routes of every table, IPv4 and
    IPv6, through verify.check_state(). Raises NetnsSetupError like it."""
    import socket

    from agentpen.workers.netns import verify
    from agentpen.workers.netns.errors import NetnsSetupError
    from pyroute2 import IPRoute

    links: list = []
    addresses: list = []
    routes: list = []
    with IPRoute(fileno=fd) as ipr:
        for msg in ipr.get_links():
            links.append(verify.Link(int(msg["index"]), str(msg.get_attr("IFLA_IFNAME")),
                                     bool(msg["flags"] & verify.IFF_UP)))
        for msg in ipr.get_addr():
            addresses.append(verify.Address(int(msg["index"]), int(msg["family"]),
                                            str(msg.get_attr("IFA_ADDRESS")), int(msg["prefixlen"])))
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.route("dump", family=family):  # every table, not just main
                table = msg.get_attr("RTA_TABLE")
                routes.append(verify.Route(
                    family=int(family), table=int(table if table is not None else msg["table"]),
                    type=int(msg["type"]), dst=msg.get_attr("RTA_DST"), dst_len=int(msg["dst_len"]),
                    oif=msg.get_attr("RTA_OIF"), gateway=msg.get_attr("RTA_GATEWAY"),
                    multipath=msg.get_attr("RTA_MULTIPATH") is not None,
                ))
    problems = verify.check_state(links, addresses, routes)
    if problems:
        raise NetnsSetupError(
            "the sandbox network namespace is not closed: " + "; ".join(problems[:8]),
            "pasta must run without --config-net, --address, --gateway or any route "
            "options; if your pasta configures the interface by itself, report it",
        )
    return verify.describe(links, addresses, routes)


def serve_remote_verifier(fd: int) -> None:
    """The verifier process's body (forked by the supervisor, every other descriptor
    closed, at nice 19): import pyroute2, wait for the netlink socket, answer, return.
    As the gate (a pasta-started worker) it imports while the worker starts; as the
    cross-check its parent made it wait for the socket first (CROSSCHECK_AFTER)."""
    import socket

    sock = socket.socket(fileno=fd)
    with contextlib.suppress(ImportError):  # reported by the dump below: fail closed
        import pyroute2  # noqa: F401  # the cost we are here to pay (early, as the gate)
    try:
        msg, fds, _, _ = socket.recv_fds(sock, 16, 1)
    except OSError:
        return
    if msg != b"v" or len(fds) != 1:
        for x in fds:
            os.close(x)
        return  # EOF (the worker gave up) or garbage: nothing to verify
    from agentpen.workers.netns.errors import NetnsSetupError

    try:
        out: dict = {"state": pyroute2_state(fds[0])}
    except NetnsSetupError as exc:
        out = {"error": exc.what, "fix": exc.how_to_fix}
    except ImportError as exc:
        out = {"error": f"pyroute2 is not importable: {exc}",
               "fix": "install agentpen with its dependencies (pip install pyroute2)"}
    except Exception as exc:  # reported, never swallowed: fail closed
        out = {"error": f"verification failed: {type(exc).__name__}: {exc}"}
    finally:
        with contextlib.suppress(OSError):  # pyroute2 closes it on exit
            os.close(fds[0])
    with contextlib.suppress(OSError):
        sock.sendall((json.dumps(out) + "\n").encode())
    sock.close()


def _wait_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.WEXITSTATUS(status)}"


# The cross-check starts this long after the jail: pyroute2's import (~100 ms of CPU,
# even at nice 19 on another core) slowed the command's own start by ~20 ms on two
# cores (issue 10). A command that ends sooner is reported as not cross-checked.
CROSSCHECK_AFTER = 0.25


class CrossCheck:
    """pyroute2's reading of the namespace, after the rtnetlink gate (``setup`` with
    ``crosscheck``): the supervisor's verifier waits, idle, until ``start()`` (called
    by ``serve`` CROSSCHECK_AFTER after the jail started) hands it a netlink socket of
    the namespace; it then imports pyroute2 and answers. Its state must equal the
    gate's; anything else (another state, an error, garbage) ends the sandbox
    (``serve`` kills the jail and reports the failure). No answer before the command
    exits is reported as such."""

    def __init__(self, verifier: RemoteVerifier, gate: dict) -> None:
        self.sock, verifier.sock = verifier.sock, None  # ours now: read in serve()
        self.gate = json.dumps(gate, sort_keys=True)
        self.data = b""
        self.t0 = time.monotonic()

    def start(self) -> None:
        """Ask the verifier to read the namespace now."""
        self.t0 = time.monotonic()
        _send_netlink_socket(self.sock)

    def gone(self) -> bool:
        """Before ``start()`` the verifier sends nothing: a readable socket is its end
        (a dead verifier fails the session before the command starts, not 0.25 s in)."""
        import select

        return bool(select.select([self.sock], [], [], 0)[0])

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> dict | None:
        """The confirmation event once the answer is complete; _Fatal on disagreement."""
        try:
            chunk = self.sock.recv(65536)
        except OSError as exc:
            self.close()
            raise _Fatal(f"the pyroute2 cross-check could not be read: {exc}") from None
        if chunk:
            self.data += chunk
            if len(self.data) > 1 << 20:
                self.close()
                raise _Fatal("the pyroute2 cross-check sent an oversized answer")
            return None
        self.close()
        from agentpen.core.events import make_event

        state = _verifier_result(self.data)
        if json.dumps(state, sort_keys=True) != self.gate:
            raise _Fatal("pyroute2 and the rtnetlink gate disagree about the sandbox namespace: "
                         f"gate {self.gate[:300]}, pyroute2 {json.dumps(state, sort_keys=True)[:300]}")
        return make_event(
            "setup-step", "pyroute2 cross-check agrees: nothing but loopback", category=["configuration"],
            type=["info"], outcome="success", event={"duration": int((time.monotonic() - self.t0) * 1e9)},
            agentpen={"step": "netns-cross-checked", "completed": True, "checked_by": "pyroute2"},
        )

    def incomplete(self) -> dict:
        from agentpen.core.events import make_event

        self.close()
        return make_event(
            "setup-step", "pyroute2 cross-check not completed: the command ended first (the "
            "rtnetlink gate had verified the namespace)", category=["configuration"], type=["info"],
            outcome="unknown", agentpen={"step": "netns-cross-checked", "completed": False,
                                         "checked_by": "pyroute2"},
        )

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def setup(ch: Channel, net: SessionPolicy | Doors, ids: tuple[int, int],
          verifier: Verifier | RemoteVerifier | None = None, *, fresh_proc: bool = True,
          crosscheck: bool = False):
    """Steps 2-4, from the doors and the user's (uid, gid) alone: the namespace does not
    depend on the rest of the policy, so a forked worker runs this before CONFIG arrives
    (issue 10). Returns (the DNS server, holding its sockets, told the allowlist later;
    the verified network state; nft's).

    ``fresh_proc``: started by pasta, in pasta's pid namespace, which needs a /proc of
    its own (a worker that joined pasta's namespaces from outside stays in the host's
    pid namespace, whose /proc is already right). ``crosscheck`` (a RemoteVerifier):
    the gate is the stdlib rtnetlink dump (``rtnl.py``, tested to agree exactly with
    pyroute2) and pyroute2 confirms it while the command starts (``CrossCheck``); else
    pyroute2 is the gate."""
    from agentpen.workers.netns import fds, listeners, nftables, verify
    from agentpen.workers.netns.dns import DnsServer
    from agentpen.workers.netns.errors import NetnsSetupError
    try:
        t = time.monotonic()
        if fresh_proc:
            osutil.mount_fresh_proc()
        nft_state = nftables.load_and_verify(net)
        _step(ch, "nftables", "nftables ruleset loaded and read back", t, nftables=nft_state)

        t = time.monotonic()
        checked_by = "pyroute2"
        if crosscheck and verifier is not None:
            # The gate, in this process: pyroute2's import (120-300 ms of CPU) would
            # otherwise be the longest wait before the command's first instruction.
            net_state = verify.verify_closed_namespace(backend="stdlib")
            checked_by = "rtnetlink"  # pyroute2 reads the namespace later: CrossCheck in serve()
            from agentpen.workers.jail import launch

            launch.seccomp.build_seccomp_program()
        elif verifier is None:
            net_state = verify.verify_closed_namespace()
            from agentpen.workers.jail import launch

            launch.seccomp.build_seccomp_program()
        else:
            verifier.dump()
            # While the child reads the namespace: the jail's imports and libseccomp's
            # first load (they would gate the command's first instruction otherwise).
            from agentpen.workers.jail import launch

            launch.seccomp.build_seccomp_program()
            net_state = verifier.result()
        _step(ch, "netns-verified", "namespace verified: nothing but loopback", t,
              network=net_state, checked_by=checked_by)

        t = time.monotonic()
        socks = listeners.create_proxy_listeners(port=net.proxy_port)
        # The allowlist comes with the policy (DnsServer.configure); its matcher and
        # dnslib once the jail runs (DnsServer.warm).
        dns = DnsServer(port=net.dns_port)
        _step(ch, "listeners", "proxy and DNS sockets created in the namespace", t,
              proxy_port=net.proxy_port, dns_port=net.dns_port)
    except NetnsSetupError as exc:
        raise _Fatal(exc.what, exc.how_to_fix) from None

    ch.send(MsgType.FDS, {"names": [f"proxy{i}" for i in range(len(socks))]},
            fds=[s.fileno() for s in socks])
    for s in socks:  # the supervisor holds them now; our copies would keep them alive
        s.close()

    # Nothing from the host's network namespace may reach the jail (pasta 2023 leaks
    # its --publish listener into its child).
    try:
        # (The cross-check's socket is the host's too, by design: a unix socket to the
        # supervisor's verifier. Neither reaches the jail: it closes every descriptor.)
        expected = {ch.fileno()}
        if crosscheck and isinstance(verifier, RemoteVerifier) and verifier.sock is not None:
            expected.add(verifier.sock.fileno())
        fds.assert_no_foreign_sockets(frozenset(expected))
    except NetnsSetupError as exc:
        raise _Fatal(exc.what, exc.how_to_fix) from None
    t = time.monotonic()
    # Leave root of pasta's namespace for the user's own uid in a child namespace
    # (see osutil.enter_own_user_namespace), then drop every capability for good.
    osutil.enter_own_user_namespace(*ids)
    osutil.drop_all_capabilities()
    # Changing credentials (the user namespace, the capabilities) cleared our parent-death
    # signal: set it again, or a killed parent would leave this worker and the jail alive.
    _die_with_parent()
    caps = osutil.capability_sets()
    if any(caps.get(k, 1) for k in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")):
        raise _Fatal(f"capabilities still held after dropping them: {caps}")
    _step(ch, "capabilities-dropped", "netns worker dropped every capability", t,
          capabilities={k: f"{v:016x}" for k, v in caps.items()})
    return dns, net_state, nft_state


def start_jail(policy: SessionPolicy, stdio: list[int], covers: list) -> tuple[int, int]:
    """Fork the jail worker. Returns (pid, read end of bwrap's JSON status pipe).

    os.fork, not multiprocess: multiprocess's child replaces stdin with /dev/null,
    and the jail must keep the user's terminal."""
    from agentpen.workers.jail.launch import exec_jail

    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            for target, fd in enumerate(stdio):  # the user's terminal, passed through pasta
                os.dup2(fd, target)
            exec_jail(policy, status_fd=w, covers=covers)
        except BaseException as exc:  # report why the jail could not start, then die
            try:
                msg = json.dumps({"agentpen-error": f"{type(exc).__name__}: {exc}"}) + "\n"
                os.write(w, msg.encode())
            finally:
                os._exit(125)
    os.close(w)
    for fd in stdio:
        os.close(fd)
    return pid, r


def serve(ch: Channel, dns, jail_pid: int, status_r: int, cross: CrossCheck | None = None) -> None:
    """Step 6: until the jail exits."""
    dns.warm()  # while bwrap sets the jail up: before the first query, off the command's path
    import gc

    if not gc.isenabled():  # off since the supervisor's start-up (cli._main): on for the session
        gc.freeze()
        gc.enable()
    sel = selectors.DefaultSelector()
    cross_at = None
    if cross is not None:  # readable before start(): the verifier died (on_readable fails)
        cross_at = time.monotonic() + CROSSCHECK_AFTER
        sel.register(cross.fileno(), selectors.EVENT_READ, "cross-check")
    pidfd = os.pidfd_open(jail_pid)
    sel.register(pidfd, selectors.EVENT_READ, "jail-exit")
    sel.register(status_r, selectors.EVENT_READ, "status")
    sel.register(ch.fileno(), selectors.EVENT_READ, "channel")
    for fd in dns.fileno_list():
        sel.register(fd, selectors.EVENT_READ, "dns")
    status_buf = b""
    jail_error = None
    while True:
        if cross_at is not None and time.monotonic() >= cross_at:
            assert cross is not None
            cross_at = None
            if cross.sock is not None:
                cross.start()
        timeout = 1.0 if cross_at is None else max(0.0, min(1.0, cross_at - time.monotonic()))
        for key, _ in sel.select(timeout=timeout):
            what = key.data
            if what == "dns":
                for body in dns.handle_readable(key.fd):
                    ch.send(MsgType.EVENT, body)
            elif what == "cross-check":
                assert cross is not None
                try:
                    confirmed = cross.on_readable()
                except _Fatal as exc:  # fail closed: the sandbox ends now
                    sel.unregister(key.fd)
                    ch.send(MsgType.STATUS, {"state": "failed", "error": exc.what, "fix": exc.fix})
                    os.kill(jail_pid, signal.SIGKILL)
                    continue
                if confirmed is not None:
                    sel.unregister(key.fd)
                    ch.send(MsgType.EVENT, confirmed)
            elif what == "status":
                chunk = os.read(status_r, 65536)
                if not chunk:
                    sel.unregister(status_r)
                    continue
                status_buf += chunk
                while b"\n" in status_buf:
                    line, status_buf = status_buf.split(b"\n", 1)
                    jail_error = _relay_status(ch, line) or jail_error
            elif what == "channel":
                msg = ch.recv()
                if msg is None:  # supervisor gone: take the sandbox down with us
                    os.kill(jail_pid, signal.SIGKILL)
                    os.waitpid(jail_pid, 0)
                    return
                msg.close_fds()
                if msg.type == MsgType.CONTROL and msg.body.get("op") == "shutdown":
                    os.kill(jail_pid, signal.SIGKILL)
            elif what == "jail-exit":
                if cross is not None and cross.sock is not None:
                    ch.send(MsgType.EVENT, cross.incomplete())
                ch.send(MsgType.EVENT, dns.audit.summary())
                _, status = os.waitpid(jail_pid, 0)
                # drain what bwrap wrote last (its exit-code line)
                try:
                    while chunk := os.read(status_r, 65536):
                        status_buf += chunk
                except OSError:
                    pass
                for line in status_buf.split(b"\n"):
                    jail_error = _relay_status(ch, line) or jail_error
                body: dict[str, object] = {"state": "exited"}
                if os.WIFSIGNALED(status):
                    body["signal"] = os.WTERMSIG(status)
                else:
                    body["exit_code"] = os.WEXITSTATUS(status)
                if jail_error:
                    body["error"] = jail_error
                ch.send(MsgType.STATUS, body)
                return


def _relay_status(ch: Channel, line: bytes) -> str | None:
    line = line.strip()
    if not line:
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if "agentpen-error" in data:
        return str(data["agentpen-error"])
    if "child-pid" in data:
        ch.send(MsgType.STATUS, {"state": "sandbox-started", "pid": int(data["child-pid"])})
    if "exit-code" in data:
        ch.send(MsgType.STATUS, {"state": "sandbox-exit-code", "exit_code": int(data["exit-code"])})
    return None


def main(argv: list[str]) -> int:
    """Started by pasta as its command (``python -m agentpen.workers.netns``): the path
    when the supervisor could not fork the worker itself (see supervisor/workers.py)."""
    if len(argv) not in (4, 6) or argv[0] != "--channel-fd" or argv[2] != "--stdio" or (
            len(argv) == 6 and argv[4] != "--verifier-fd"):
        print("usage: python -m agentpen.workers.netns --channel-fd N --stdio I,O,E "
              "[--verifier-fd V] (started by agentpen)", file=sys.stderr)
        return 2
    stdio = [int(x) for x in argv[3].split(",")]
    channel_fd = int(argv[1])
    verifier: Verifier | RemoteVerifier
    if len(argv) == 6:  # the supervisor's verifier has been importing pyroute2 since before pasta
        verifier = RemoteVerifier(int(argv[5]))
        keep = {verifier.sock.fileno()}
    else:
        # First act: pyroute2's import runs in the verifier child, on the other core,
        # from here on (the child closes every descriptor but its two pipes at once).
        verifier = Verifier.start()
        keep = {verifier.go_w, verifier.res_r}
    _load()
    # Keep only what the supervisor gave us: pasta 2023 leaves its own host-side
    # sockets (a --publish listener) inheritable in its child.
    osutil.close_fds_except({channel_fd, *stdio, *keep})
    # Die with pasta (and pasta dies with the supervisor): nothing outlives a session.
    _PARENT[:] = [os.getppid(), -1]
    _die_with_parent()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return run(Channel.from_fd(channel_fd), stdio, verifier, fresh_proc=True)


def forked_main(channel_fd: int, stdio: list[int], verifier_fd: int, holder_fd: int,
                pasta_pid: int, parent: int, env: dict[str, str], doors: Doors) -> int:
    """The worker forked by the supervisor (supervisor/workers.py): it starts in the
    supervisor's namespaces, as a copy of it, and makes itself the worker pasta would
    have started: then it joins pasta's user and network namespaces (workers/netns/join.py).

    Same order, same checks, same messages as ``main`` from HELLO on. The caller runs
    this in the child right after fork and ``os._exit``s with its result."""
    # Die with the supervisor; be in pasta's process group, which is what the guardian
    # and NetnsWorker.kill() take down (and no terminal signal reaches it).
    from agentpen.core import osutil as os_util

    os_util.set_pdeathsig(signal.SIGKILL, expected_parent=parent)
    with contextlib.suppress(OSError):
        os.setpgid(0, pasta_pid)
    # A fresh process's signal state: the supervisor blocks signals for its signalfd.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                signal.SIGTTOU, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # Nothing of the supervisor's environment (the user's: tokens, keys) stays in ours.
    os_util.replace_environment(env)
    os_util.close_fds_except({channel_fd, *stdio, holder_fd, verifier_fd})
    with contextlib.suppress(OSError):
        os_util.set_name(b"agentpen-netns")
    import socket

    from agentpen.workers.netns import join

    # Never a Verifier of our own here: forked before the join, it would read the host's
    # namespace. The supervisor forks the worker only with its verifier ready.
    verifier = RemoteVerifier(verifier_fd)
    _load()
    # While pasta builds the namespace: every module the setup and the jail need.
    from agentpen.workers.jail import launch
    from agentpen.workers.netns import dns, fds, listeners, nftables, verify  # noqa: F401

    # The jail's syscall filter too (libseccomp's load and compile, ~5 ms): it depends
    # on nothing of the session, and the worker (our fork) would build it on its path.
    # A failure is met again, and reported with the other setup steps, by setup().
    with contextlib.suppress(Exception):
        launch.seccomp.build_seccomp_program()

    ids = (os.getuid(), os.getgid())  # the user's: after the join we are uid 0 there
    ch = Channel.from_fd(channel_fd)
    holder_sock = socket.socket(fileno=holder_fd)
    try:
        join.join(join.read_holder(holder_sock, SETUP_TIMEOUT), pasta_pid)
    except Exception as exc:
        verifier.abandon()
        what = getattr(exc, "what", None) or f"{type(exc).__name__}: {exc}"
        ch.send(MsgType.HELLO, {"role": "netns", "pid": os.getpid(), "proto": 1})
        ch.send(MsgType.STATUS, {"state": "failed", "error": what, "fix": getattr(exc, "how_to_fix", None)})
        return 1
    finally:
        holder_sock.close()  # the supervisor's copy alone keeps the holder (and pasta) up
    # Joining a user namespace changed our credentials, which cleared the parent-death
    # signal set above: set it again (the supervisor's death must end us).
    os_util.set_pdeathsig(signal.SIGKILL, expected_parent=parent)
    # Our children are in pasta's pid namespace now (join.join), as they were when pasta
    # started the worker: the worker proper is such a child, so that the jail and
    # everything under it live in a pid namespace that the kernel empties when the
    # holder, its first process, exits (the session's end, or the supervisor's death):
    # nothing the jail leaves behind (an orphan of a killed bwrap) outlives the session.
    # This process only waits for it, and dies with the supervisor, taking it along.
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)  # EOF for the child once we are gone
    worker = os.fork()
    if worker == 0:
        # Our parent is outside our pid namespace (getppid() says 0 whether it lives or
        # not): its pipe tells, and the parent-death signal is checked against it.
        os.close(alive_w)
        _PARENT[:] = [0, alive_r]
        _die_with_parent()
        # pid namespace and /proc disagree until we mount our own, as pasta's child did
        return run(ch, stdio, verifier, fresh_proc=True, crosscheck=True, early=(doors, *ids))
    os.close(alive_r)
    ch.close()
    verifier.abandon()
    for fd in stdio:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os_util.set_name(b"agentpen-nsjoin")
    while True:
        try:
            _, status = os.waitpid(worker, 0)
            break
        except InterruptedError:
            continue
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1


# The parent whose death must end this worker: [what getppid() says while it lives, a
# pipe that reads EOF once it is gone or -1]. Used to set the parent-death signal again
# after each change of credentials (which clears it).
_PARENT = [0, -1]


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL), then make sure the parent did not die before it."""
    import select

    from agentpen.core import osutil as os_util

    os_util.set_pdeathsig(signal.SIGKILL, expected_parent=_PARENT[0])
    if _PARENT[1] >= 0 and select.select([_PARENT[1]], [], [], 0)[0]:
        os.kill(os.getpid(), signal.SIGKILL)

# How long a forked worker waits for pasta's namespace (the session's own setup limit).
SETUP_TIMEOUT = 30.0


def run(ch: Channel, stdio: list[int], verifier: Verifier | RemoteVerifier, *, fresh_proc: bool,
        crosscheck: bool = False, early: tuple[Doors, int, int] | None = None) -> int:
    """Steps 1-6, from HELLO to the command's exit (both ways of starting).

    ``early`` (a forked worker: the doors pasta was started with, the user's uid and
    gid, all known at the fork): the namespace is set up before CONFIG arrives, while
    the supervisor still resolves the policy, and CONFIG must then describe that very
    namespace. Without it (started by pasta), CONFIG first. Either way "verified" follows
    CONFIG, and the command waits for "go"."""
    ch.send(MsgType.HELLO, {"role": "netns", "pid": os.getpid(), "proto": 1})
    try:
        policy = None
        if early is None:
            policy = SessionPolicy.from_json(_wait_for(ch, MsgType.CONFIG)["policy"])
            net, ids = policy, (policy.uid, policy.gid)
        else:
            net, ids = early[0], (early[1], early[2])
        # A worker that joined pasta's namespaces has the supervisor's verifier (no
        # capability in the namespace): it may confirm after the gate (CrossCheck).
        crosscheck = crosscheck and isinstance(verifier, RemoteVerifier)
        cross = None
        try:
            # Builds the seccomp program once while the verifier dumps: the jail's
            # imports and libseccomp's first load are paid before "verified", not
            # after "go" (they would gate the command's first instruction).
            dns, net_state, nft_state = setup(ch, net, ids, verifier, fresh_proc=fresh_proc,
                                              crosscheck=crosscheck)
            if crosscheck:
                cross = CrossCheck(verifier, net_state)  # type: ignore[arg-type]
        finally:
            verifier.abandon()  # reaped already on success; never outlives setup
        if policy is None:
            policy = SessionPolicy.from_json(_wait_for(ch, MsgType.CONFIG)["policy"])
            if (policy.doors(), policy.uid, policy.gid) != (net, *ids):
                raise _Fatal("the session's doors or user are not the ones the namespace was set up for")
        dns.configure(policy.allow, learn=policy.learn)
        if cross is not None and cross.gone():
            raise _Fatal("the pyroute2 verifier went away before the command started")
        ch.send(MsgType.STATUS, {"state": "verified", "network": net_state, "nftables": nft_state})
        body = _wait_for(ch, MsgType.CONTROL)
        if body.get("op") != "go":
            raise _Fatal(f"unexpected instruction {body.get('op')!r}")
        from agentpen.workers.jail.protect import Cover

        # The persistence covers come with "go": the supervisor computes them while we
        # set the namespace up (the CONFIG that starts us is sent before that).
        covers = [Cover(c["path"], c["kind"], c["rel"], c["data"].encode(), c.get("source", ""))
                  for c in body.get("covers", [])]
        # ... and the policy as the supervisor finally resolved it (a paranoid session's
        # throwaway project, rlimits): what the namespace was set up for must not change.
        final = SessionPolicy.from_json(body["policy"]) if "policy" in body else policy
        if final.network_view() != policy.network_view():
            raise _Fatal("the session's network policy changed after the namespace was set up")
        jail_pid, status_r = start_jail(final, stdio, covers)
        # From here on this worker only parses DNS queries from the sandbox and relays
        # status: no exec, no namespaces, no ptrace (core.confine's table).
        from agentpen.core.confine import confine

        denied = confine()
        ch.send(MsgType.STATUS, {"state": "jail-started", "pid": jail_pid})
        ch.send(MsgType.EVENT, make_event(
            "setup-step", "netns worker confined itself (no_new_privs + seccomp)",
            category=["configuration"], type=["change"], outcome="success",
            agentpen={"step": "netns-confined", "seccomp_denied": len(denied)},
        ))
        serve(ch, dns, jail_pid, status_r, cross)
        # Everything is reported and nothing is buffered: skip the interpreter's
        # teardown (tens of ms of module and GC finalisation that pasta, and so the
        # session's end, would wait for).
        os._exit(0)
    except _Fatal as exc:
        ch.send(MsgType.STATUS, {"state": "failed", "error": exc.what, "fix": exc.fix})
        return 1
    except Exception as exc:
        ch.send(MsgType.STATUS, {"state": "failed", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": _traceback()})
        return 1
