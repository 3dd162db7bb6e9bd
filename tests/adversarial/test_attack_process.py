"""Attack battery, processes and kernel: signalling and ptracing the supervisor and its
workers, nested namespaces, mount, keyrings, bpf, perf, userfaultfd, io_uring,
process_vm_*, terminal injection (TIOCSTI/TIOCLINUX, high bits set) under a pty.
Through the full `agentpen` command as an unprivileged user.

Syscall control rule: a refusal inside counts only if the same call, with the same
arguments, gets past the permission gate outside, on the host or in a user namespace of
the host (`unshare -Urm`): so the EPERM inside is the sandbox's doing, not the kernel's
normal answer to an unprivileged caller."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

PY = "/usr/bin/python3"
AGENTPEN = [sys.executable, "-m", "agentpen.supervisor"]

EPERM, ENOSYS = errno.EPERM, errno.ENOSYS
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x20000, 0x40000000, 0x20000000

# name -> (syscall number on x86_64, arguments): harmless arguments chosen so that an
# allowed call fails on its arguments (EFAULT, EINVAL, EBADF...) or does nothing lasting.
SYSCALLS: dict[str, tuple[int, list]] = {
    "bpf": (321, [9999, 0, 0]),  # unknown command: EINVAL when the call is let through
    "perf_event_open": (298, [0, 0, -1, -1, 0]),  # NULL attr: EFAULT
    "userfaultfd": (323, [1]),  # UFFD_USER_MODE_ONLY
    "io_uring_setup": (425, [1, 0]),  # NULL params: EFAULT
    "io_uring_enter": (426, [-1, 0, 0, 0, 0, 0]),  # EBADF
    "io_uring_register": (427, [-1, 0, 0, 0]),  # EBADF
    "keyctl_session": (250, [0, -3, 0]),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "keyctl_user": (250, [0, -4, 0]),  # ... of the user keyring (not namespaced)
    "add_key": (248, ["user", "agentpen-probe", 0, 0, -3]),  # NULL payload, len 0
    "request_key": (249, ["user", "agentpen-nonexistent", 0, -3]),
    "mount_tmpfs": (165, ["none", "/tmp", "tmpfs", 0, 0]),
    "umount2": (166, ["/proc", 2]),  # MNT_DETACH
    "fsopen": (430, ["tmpfs", 0]),
    "open_tree": (428, [-100, "/tmp", 1]),  # OPEN_TREE_CLONE
    "move_mount": (429, [-1, "", -1, "", 0]),
    "mount_setattr": (442, [-1, "", 0, 0, 0]),
    "pivot_root": (155, ["/nonexistent", "/nonexistent"]),
    "chroot": (161, ["/"]),
    "kcmp": (312, [os.getpid(), os.getpid(), 0, 0, 0]),  # KCMP_FILE fd 0 with itself
    "name_to_handle_at": (303, [-100, "/", 0, 0, 0]),
    "open_by_handle_at": (304, [-100, 0, 0]),
    "personality": (135, [0x0040000]),  # ADDR_NO_RANDOMIZE
    "clone3": (435, [0, 0]),
    "unshare_user": (272, [CLONE_NEWUSER]),
    "unshare_net": (272, [CLONE_NEWNET]),
    "unshare_mnt": (272, [CLONE_NEWNS]),
    "unshare_pid": (272, [CLONE_NEWPID]),
}
# kcmp's pid arguments are filled in by the probe's own pid below (see _checks).


def _checks() -> list[dict]:
    out: list[dict] = []
    for name, (nr, args) in SYSCALLS.items():
        if name == "kcmp":
            continue
        out.append({"name": name, "op": "syscall", "nr": nr, "args": args})
    out += [
        {"name": "kcmp_self", "op": "run", "argv": [PY, "-c", (
            "import ctypes,os; l=ctypes.CDLL(None,use_errno=True); p=os.getpid();"
            "r=l.syscall(312,p,p,0,0,0); print(0 if r==0 else ctypes.get_errno())")]},
        {"name": "ptrace_child", "op": "ptrace_child"},
        {"name": "process_vm_readv", "op": "process_vm_readv_child"},
        {"name": "setns_mnt", "op": "setns", "path": "/proc/self/ns/mnt"},
        {"name": "unshare_U", "op": "run", "argv": ["/usr/bin/unshare", "-U", "true"]},
        {"name": "unshare_rn", "op": "run", "argv": ["/usr/bin/unshare", "-rn", "true"]},
        {"name": "unshare_rm", "op": "run", "argv": ["/usr/bin/unshare", "-rm", "true"]},
        {"name": "unshare_rpf", "op": "run", "argv": ["/usr/bin/unshare", "-rpf", "true"]},
    ]
    # The unshare syscalls move the probe itself into new namespaces when they work:
    # keep them last.
    return sorted(out, key=lambda c: c["name"].startswith("unshare_") and c["op"] == "syscall")


def _errno_of(r: dict) -> int | None:
    if r.get("op_rc") is not None:
        return r["op_rc"]
    if "rc" in r:  # a `run` check: the program's verdict
        return 0 if r["rc"] == 0 else -1
    return r.get("errno")


def _gated(r: dict) -> bool:
    """Did the call get past the permission gate (anything but EPERM/EACCES)?"""
    if "rc" in r:
        if r.get("out", "").strip().isdigit():  # kcmp_self prints 0 or the errno
            return int(r["out"].strip()) not in (EPERM, errno.EACCES)
        return r["rc"] == 0
    return r.get("ok") or r.get("errno") not in (EPERM, errno.EACCES, None)


def test_kernel_side_doors_are_refused_with_controls(prober, sandbox):
    checks = _checks()
    host = prober.host(checks)
    script, cfile = prober.argv(checks)[1:]
    p = subprocess.run(["unshare", "-Urm", PY, script, cfile], capture_output=True, text=True, timeout=60,
                       cwd=sandbox.project, stdin=subprocess.DEVNULL)
    userns = prober.parse(p.stdout)
    res, _ = prober.inside(checks)
    for c in checks:
        k = c["name"]
        assert _gated(host[k]) or _gated(userns[k]), (k, "no control gets past the gate", host[k], userns[k])
        r = res[k]
        if k == "clone3":
            assert r["errno"] == ENOSYS, r  # so libc falls back to clone(2), whose flags seccomp sees
        elif k == "kcmp_self":
            assert r["out"].strip() == str(EPERM), r
        elif "rc" in r:
            assert r["rc"] != 0, (k, r)
        else:
            assert not r["ok"] and r["errno"] == EPERM, (k, r)


TIOCSTI, TIOCLINUX, TIOCGWINSZ = 0x5412, 0x541C, 0x5413
HIGH = 1 << 32


def _tty_checks() -> list[dict]:
    return [
        {"name": "tiocgwinsz", "op": "ioctl", "fd": 0, "request": TIOCGWINSZ},
        {"name": "tiocsti", "op": "ioctl", "fd": 0, "request": TIOCSTI, "arg": "#"},
        {"name": "tiocsti_hi", "op": "ioctl", "fd": 0, "request": TIOCSTI | HIGH, "arg": "#"},
        {"name": "tiocsti_hi_all", "op": "ioctl", "fd": 0, "request": TIOCSTI | 0xFFFFFFFF00000000,
         "arg": "#"},
        {"name": "tioclinux_paste", "op": "ioctl", "fd": 0, "request": TIOCLINUX, "arg": "\x03"},
        {"name": "tioclinux_hi", "op": "ioctl", "fd": 0, "request": TIOCLINUX | HIGH, "arg": "\x03"},
    ]


def _under_pty(argv: list[str], env: dict, cwd: Path, timeout: float = 60) -> tuple[int, str]:
    master, slave = os.openpty()

    def child_setup() -> None:  # runs in the child: a session whose controlling tty is the pty
        os.login_tty(slave)

    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                         preexec_fn=child_setup, close_fds=True)
    os.close(slave)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out under the pty: {buf[-2000:]!r}"
            r, _, _ = select.select([master], [], [], left)
            if not r:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every slave side closed
                break
            if not chunk:
                break
            buf += chunk
        return p.wait(timeout=max(1.0, deadline - time.monotonic())), buf.decode(errors="replace")
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()


def test_terminal_injection_refused_under_a_pty_with_high_bits(prober, sandbox):
    checks = _tty_checks()
    argv = prober.argv(checks)
    rc, out = _under_pty(argv, sandbox.env(), sandbox.project)
    host = prober.parse(out)
    assert rc == 0
    assert host["tiocgwinsz"]["ok"]
    # control: on the host the same pty accepts TIOCSTI (0) or, where the kernel disabled
    # legacy TIOCSTI, refuses it with EIO; never seccomp's EPERM. TIOCLINUX is not for ptys
    # (ENOTTY/EINVAL): the kernel looked at it.
    for k in ("tiocsti", "tiocsti_hi", "tiocsti_hi_all"):
        assert host[k]["ok"] or host[k]["errno"] == errno.EIO, (k, host[k])
    for k in ("tioclinux_paste", "tioclinux_hi"):
        assert host[k]["errno"] != EPERM, (k, host[k])
    audit = sandbox.root / "pty.jsonl"
    rc, out = _under_pty([*AGENTPEN, "--log-format", "json", "--audit-log", str(audit), "--", *argv],
                         sandbox.env(), sandbox.project)
    inside = prober.parse(out)
    assert rc == 0, out[-2000:]
    assert inside["tiocgwinsz"]["ok"]  # a permitted ioctl on the same terminal works
    for k in ("tiocsti", "tiocsti_hi", "tiocsti_hi_all", "tioclinux_paste", "tioclinux_hi"):
        assert not inside[k]["ok"] and inside[k]["errno"] == EPERM, (k, inside[k])


KILLER = textwrap.dedent("""
    import ctypes, json, os, signal, subprocess, sys
    libc = ctypes.CDLL(None, use_errno=True)
    bg = subprocess.Popen(["/bin/sleep", "300"])  # a sibling inside: kill -1 must reach it
    print("READY", flush=True)
    pids = json.loads(sys.stdin.readline())
    out = {}
    for role, pid in pids.items():
        try:
            os.kill(pid, signal.SIGKILL)
            out[role + ":kill"] = 0
        except OSError as e:
            out[role + ":kill"] = e.errno
        ctypes.set_errno(0)
        r = libc.syscall(101, 16, pid, 0, 0)  # PTRACE_ATTACH
        out[role + ":ptrace"] = 0 if r == 0 else ctypes.get_errno()
    visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    out["visible_pids"] = visible
    print("ATTEMPTS " + json.dumps(out), flush=True)
    sys.stdin.readline()  # the host checks everything is alive, then lets us go on
    os.kill(-1, signal.SIGKILL)  # kill -9 -1: everything we may signal but ourselves
    bg.wait()
    print("SIBLING", bg.returncode, flush=True)
    os.kill(0, signal.SIGKILL)  # our own process group: the command dies, nothing else
    print("NOT-REACHED", flush=True)
""")


def _wait_audit(path: Path, action: str, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        events = [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []
        if any(e["event"]["action"] == action for e in events):
            return events
        assert time.monotonic() < deadline, f"no {action} in {[e['event']['action'] for e in events]}"
        select.select([], [], [], 0.02)  # poll the file: the audit log has no notification


def _line(stream, prefix: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {prefix!r} line: {buf[-2000:]!r}"
        r, _, _ = select.select([stream], [], [], left)
        if r:
            ch = os.read(stream.fileno(), 1)
            assert ch, f"EOF before {prefix!r}: {buf[-2000:]!r}"
            buf += ch
            if ch == b"\n":
                line = buf.decode().rsplit("\n", 2)[-2]
                if line.startswith(prefix):
                    return line[len(prefix):]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_signals_and_ptrace_cannot_reach_the_supervisor_or_workers(sandbox):
    script = sandbox.project / ".killer.py"
    script.write_text(KILLER)
    audit = sandbox.root / "kill.jsonl"
    p = sandbox.popen("--", PY, str(script), audit=audit, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        _line(p.stdout, "READY")
        _wait_audit(audit, "command-started")
        # The proxy starts on the first connection or shortly after "go" (issue 10).
        deadline = time.monotonic() + 30
        while '"role":"proxy"' not in audit.read_text():
            assert time.monotonic() < deadline, "the proxy never started"
            select.select([], [], [], 0.02)
        events = _wait_audit(audit, "command-started")
        pids = {"supervisor": p.pid}
        for e in events:
            role = e.get("agentpen", {}).get("role")
            if e["event"]["action"] == "worker-started" and role:
                pids[role] = e["process"]["pid"]
            if e["event"]["action"] == "setup-step" and "pid" in e.get("process", {}):
                pids["netns"] = e["process"]["pid"]
        assert {"supervisor", "proxy", "pasta", "netns", "jail"} <= set(pids), pids
        p.stdin.write((json.dumps(pids) + "\n").encode())
        p.stdin.flush()
        attempts = json.loads(_line(p.stdout, "ATTEMPTS "))
        alive = {role: _alive(pid) for role, pid in pids.items()}
        p.stdin.write(b"go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    for role in pids:
        assert attempts[f"{role}:kill"] == errno.ESRCH, (role, attempts)  # not even visible
        assert attempts[f"{role}:ptrace"] in (EPERM, errno.ESRCH), (role, attempts)
    assert max(attempts["visible_pids"]) < 100, attempts["visible_pids"]  # own pid namespace
    assert all(alive.values()), alive
    text = out.decode()
    # control: kill -9 -1 inside does kill (the sibling died of SIGKILL), and kill(0) killed
    # the command itself: the session reports 128+9 and ends normally
    assert f"SIBLING {-signal.SIGKILL}" in text, text
    assert "NOT-REACHED" not in text
    assert p.returncode == 128 + signal.SIGKILL, err
    events = [json.loads(x) for x in audit.read_text().splitlines() if x]
    actions = [e["event"]["action"] for e in events]
    assert actions[-1] == "session-ended", actions
    ended = events[-1]
    assert ended["event"]["outcome"] == "success", ended
    assert "worker-restarted" not in actions
    crashed = [e for e in events if e["event"]["action"] == "worker-exited"
               and e.get("agentpen", {}).get("role") in ("proxy", "netns", "pasta")
               and e.get("agentpen", {}).get("signal")]
    assert crashed == [], crashed


def test_no_descriptor_leaks_into_the_sandbox(prober, sandbox):
    """No socket (channel to the supervisor, pasta's leaked listener, the proxy's listeners),
    pidfd, memfd or host directory is open in any sandbox process."""
    checks = [{"name": "scan", "op": "fd_scan"}, {"name": "pts", "op": "listdir", "path": "/dev/pts"}]
    # control: the same scan on the host sees a socket the parent passed down
    a, b = socket.socketpair()
    try:
        p = subprocess.run(prober.argv(checks), capture_output=True, text=True, timeout=60,
                           pass_fds=(b.fileno(),), cwd=sandbox.project, stdin=subprocess.DEVNULL)
    finally:
        a.close()
        b.close()
    host = prober.parse(p.stdout)["scan"]["fds"]["self"]
    assert any(t.startswith("socket:") for t in host.values()), host
    res, _ = prober.inside(checks)
    fds = res["scan"]["fds"]
    assert "self" in fds and "1" in fds, fds  # the probe and bwrap's pid 1 were scanned
    bad = {(pid, fd, t) for pid, m in fds.items() for fd, t in m.items()
           if t.startswith(("socket:", "anon_inode:[pidfd]", "/memfd:", "anon_inode:bpf",
                            "anon_inode:[io_uring]"))
           or (t.startswith("/") and not t.startswith(("/dev/", "/proc/", str(sandbox.project))))}
    assert bad == set(), bad
    extra = {(pid, fd) for pid, m in fds.items() for fd in m if int(fd) > 2
             and not m[fd].startswith(("anon_inode:[eventfd]", "/proc/"))}
    assert extra == set(), fds
    assert set(res["pts"]["entries"]) <= {"ptmx"}, res["pts"]  # a private devpts: no host terminals


PROC_WRITES = {
    "core_pattern": "/proc/sys/kernel/core_pattern",  # classic escape: a host-run helper
    "sysrq": "/proc/sysrq-trigger",
    "ping_group_range": "/proc/sys/net/ipv4/ping_group_range",
    "ip_forward": "/proc/sys/net/ipv4/ip_forward",
    "disable_ipv6": "/proc/sys/net/ipv6/conf/all/disable_ipv6",
    "uid_map": "/proc/self/uid_map",
}


def test_no_privilege_from_proc_or_setuid(prober, sandbox):
    checks = [{"name": k, "op": "write", "path": v, "data": "1\n"} for k, v in PROC_WRITES.items()]
    checks += [
        {"name": "control", "op": "write", "path": str(sandbox.project / ".writable")},
        {"name": "status", "op": "read", "path": "/proc/self/status"},
        {"name": "setuid_mount", "op": "run", "argv": ["/usr/bin/mount", "-t", "tmpfs", "none", "/tmp"]},
        {"name": "setuid_umount", "op": "run", "argv": ["/usr/bin/umount", "-l", "/tmp"]},
    ]
    res, _ = prober.inside(checks)
    assert res["control"]["ok"], res["control"]  # the write op works
    for k in PROC_WRITES:
        refused = (errno.EROFS, errno.EACCES, EPERM, errno.ENOENT)  # ENOENT: sysrq absent here
        assert not res[k]["ok"] and res[k]["errno"] in refused, (k, res[k])
    status = dict(line.split(":\t", 1) for line in res["status"]["data"].splitlines() if ":\t" in line)
    assert status["NoNewPrivs"].strip() == "1" and int(status["CapEff"], 16) == 0, status
    assert not res["setuid_mount"]["ok"] and not res["setuid_umount"]["ok"]
    # control: those binaries are setuid root on the host (su is left out: PAM's failure
    # delay costs seconds; no_new_privs covers every setuid binary alike)
    assert all(os.stat(b).st_mode & 0o4000 for b in ("/usr/bin/mount", "/usr/bin/umount"))


def test_every_sandbox_process_is_filtered_so_its_memory_is_worth_nothing(prober):
    """bwrap's pid 1 in the sandbox has the same uid and its /proc/1/mem opens read-write:
    injecting code there must gain nothing, so pid 1 must carry the same seccomp filter, no
    capabilities and no_new_privs as the command."""
    checks = [{"name": "scan", "op": "status_scan"}]
    host = prober.host(checks)["scan"]["procs"]
    assert any(st["Seccomp"] == "0" for st in host.values()), "control: the scan sees unfiltered processes"
    res, _ = prober.inside(checks)
    procs = res["scan"]["procs"]
    assert "1" in procs and len(procs) >= 2, procs  # bwrap's init and the probe
    for pid, st in procs.items():
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", (pid, st)
        assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, (pid, st)
    # (measured: procs["1"]["mem_rw"] is True with bwrap 0.8, hence this test)
