"""The netns worker process: started by pasta inside the sandbox's fresh user and
network namespace, where it is root of that user namespace.

Order (each step reported to the supervisor, any failure ends the session before
the command runs):
  1. HELLO, then receive the session policy (CONFIG) -- never from argv or env;
  2. load the nftables ruleset and read it back; verify links, addresses and routes
     with pyroute2 (nothing but loopback);
  3. create the proxy's listening sockets (127.0.0.1:443, [::1]:443) and the DNS
     sockets (port 53) -- both need privilege in this namespace -- and send the
     proxy's up to the supervisor (SCM_RIGHTS);
  4. drop every capability, prove it from /proc/self/status, report "verified";
  5. wait for the supervisor's "go" (the session start is on disk), fork the jail
     worker, which execs bwrap around the command;
  6. serve DNS for the allowlist, relay bwrap's JSON status (pids, exit code) and
     report the command's exit.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import time
import traceback

from agentpen.core import osutil
from agentpen.core.channel import Channel, MsgType
from agentpen.core.events import make_event
from agentpen.core.policy import SessionPolicy


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


def setup(ch: Channel, policy: SessionPolicy):
    """Steps 2-4. Returns the DNS server (already holding its sockets)."""
    from agentpen.workers.netns import fds, listeners, nftables, verify
    from agentpen.workers.netns.dns import DnsServer
    from agentpen.workers.netns.errors import NetnsSetupError
    from agentpen.workers.proxy.allowlist import Allowlist

    try:
        t = time.monotonic()
        osutil.mount_fresh_proc()
        nft_state = nftables.load_and_verify(policy)
        _step(ch, "nftables", "nftables ruleset loaded and read back", t, nftables=nft_state)

        t = time.monotonic()
        net_state = verify.verify_closed_namespace()
        _step(ch, "netns-verified", "namespace verified: nothing but loopback", t,
              network=net_state)

        t = time.monotonic()
        socks = listeners.create_proxy_listeners(port=policy.proxy_port)
        matcher = Allowlist(policy.allow).match
        dns = DnsServer(matcher, learn=policy.learn, port=policy.dns_port)
        _step(ch, "listeners", "proxy and DNS sockets created in the namespace", t,
              proxy_port=policy.proxy_port, dns_port=policy.dns_port)
    except NetnsSetupError as exc:
        raise _Fatal(exc.what, exc.how_to_fix) from None

    ch.send(MsgType.FDS, {"names": [f"proxy{i}" for i in range(len(socks))]},
            fds=[s.fileno() for s in socks])
    for s in socks:  # the supervisor holds them now; our copies would keep them alive
        s.close()

    # Nothing from the host's network namespace may reach the jail (pasta 2023 leaks
    # its --publish listener into its child).
    try:
        fds.assert_no_foreign_sockets(frozenset({ch.fileno()}))
    except NetnsSetupError as exc:
        raise _Fatal(exc.what, exc.how_to_fix) from None
    t = time.monotonic()
    # Leave root of pasta's namespace for the user's own uid in a child namespace
    # (see osutil.enter_own_user_namespace), then drop every capability for good.
    osutil.enter_own_user_namespace(policy.uid, policy.gid)
    osutil.drop_all_capabilities()
    caps = osutil.capability_sets()
    if any(caps.get(k, 1) for k in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")):
        raise _Fatal(f"capabilities still held after dropping them: {caps}")
    _step(ch, "capabilities-dropped", "netns worker dropped every capability", t,
          capabilities={k: f"{v:016x}" for k, v in caps.items()})
    ch.send(MsgType.STATUS, {"state": "verified", "network": net_state, "nftables": nft_state})
    return dns


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


def serve(ch: Channel, dns, jail_pid: int, status_r: int) -> None:
    """Step 6: until the jail exits."""
    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(jail_pid)
    sel.register(pidfd, selectors.EVENT_READ, "jail-exit")
    sel.register(status_r, selectors.EVENT_READ, "status")
    sel.register(ch.fileno(), selectors.EVENT_READ, "channel")
    for fd in dns.fileno_list():
        sel.register(fd, selectors.EVENT_READ, "dns")
    status_buf = b""
    jail_error = None
    while True:
        for key, _ in sel.select(timeout=1.0):
            what = key.data
            if what == "dns":
                for body in dns.handle_readable(key.fd):
                    ch.send(MsgType.EVENT, body)
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
    if len(argv) != 4 or argv[0] != "--channel-fd" or argv[2] != "--stdio":
        print("usage: python -m agentpen.workers.netns --channel-fd N --stdio I,O,E "
              "(started by agentpen)", file=sys.stderr)
        return 2
    stdio = [int(x) for x in argv[3].split(",")]
    channel_fd = int(argv[1])
    # Keep only what the supervisor gave us: pasta 2023 leaves its own host-side
    # sockets (a --publish listener) inheritable in its child.
    osutil.close_fds_except({channel_fd, *stdio})
    from agentpen.workers.netns import verify

    verify.preload_in_background()  # pyroute2's import overlaps the CONFIG round trip and nft
    # Die with pasta (and pasta dies with the supervisor): nothing outlives a session.
    osutil.set_pdeathsig(signal.SIGKILL, expected_parent=os.getppid())
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ch = Channel.from_fd(channel_fd)
    ch.send(MsgType.HELLO, {"role": "netns", "pid": os.getpid(), "proto": 1})
    try:
        config = _wait_for(ch, MsgType.CONFIG)
        policy = SessionPolicy.from_json(config["policy"])
        from agentpen.workers.jail import launch
        from agentpen.workers.jail.protect import Cover

        covers = [Cover(c["path"], c["kind"], c["rel"], c["data"].encode()) for c in config["covers"]]
        dns = setup(ch, policy)
        # Pay the jail's imports and libseccomp's first load before "verified", not
        # after "go" (they gate the command's first instruction otherwise).
        launch.seccomp.build_seccomp_program()
        body = _wait_for(ch, MsgType.CONTROL)
        if body.get("op") != "go":
            raise _Fatal(f"unexpected instruction {body.get('op')!r}")
        jail_pid, status_r = start_jail(policy, stdio, covers)
        ch.send(MsgType.STATUS, {"state": "jail-started", "pid": jail_pid})
        serve(ch, dns, jail_pid, status_r)
        return 0
    except _Fatal as exc:
        ch.send(MsgType.STATUS, {"state": "failed", "error": exc.what, "fix": exc.fix})
        return 1
    except Exception as exc:
        ch.send(MsgType.STATUS, {"state": "failed", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=8)})
        return 1
