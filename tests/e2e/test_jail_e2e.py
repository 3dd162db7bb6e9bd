"""The jail end to end: real bwrap started by exec_jail, as an unprivileged user.

Each attack runs with a positive control: the same probe outside the jail (or in
a place where it must work) shows that it would succeed, so the refusal inside is
the jail's doing. No pasta here: the network namespace is the netns worker's job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from agentpen.core.policy import Mount, SessionPolicy
from agentpen.core.record import replace
from agentpen.workers.jail.env import scrub_env
from agentpen.workers.jail.launch import jail_covers, remove_placeholders

pytestmark = pytest.mark.e2e

CANARY = "hunter2-e2e-secret-value"
RUNNER = textwrap.dedent("""
    import json, signal, sys
    from agentpen.core.policy import SessionPolicy
    from agentpen.workers.jail.launch import exec_jail
    if sys.argv[3:] == ["hostile-parent"]:  # dispositions a parent may leave behind
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
    exec_jail(SessionPolicy.from_json(json.loads(sys.argv[1])), status_fd=int(sys.argv[2]))
""")
PY = "/usr/bin/python3"  # the system python: visible read-only inside the jail
TIMEOUT = 60


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CANARY_TOKEN=CANARY, SSH_AUTH_SOCK="/tmp/ssh-fake/agent.1",
               ANTHROPIC_API_KEY="sk-ant-dummy")
    return env


def make_world(tmp_path: Path) -> tuple[Path, Path]:
    """A fake real home with secrets, a sibling repo, and the project (a git repo)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_x").write_text("PRIVATE KEY " + CANARY)
    (home / "sibling").mkdir()
    (home / "sibling" / "notes.txt").write_text("sibling " + CANARY)
    proj = home / "src" / "repo"
    proj.mkdir(parents=True)
    git = ["git", "-C", str(proj), "-c", "user.name=t", "-c", "user.email=t@x"]
    subprocess.run(["git", "init", "-q", str(proj)], check=True, timeout=TIMEOUT)
    (proj / "README").write_text("hello\n")
    subprocess.run([*git, "add", "README"], check=True, timeout=TIMEOUT)
    subprocess.run([*git, "commit", "-qm", "init"], check=True, timeout=TIMEOUT)
    (proj / ".git" / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n")
    return home, proj


def make_policy(home: Path, proj: Path, argv: list[str], **kw: Any) -> SessionPolicy:
    ident = {"home": str(home), "user": "aptest", "shell": "/bin/sh"}
    env = scrub_env(host_env(), **ident, path_dirs=[],
                    passthrough=["ANTHROPIC_API_KEY", "SSH_AUTH_SOCK"])
    return SessionPolicy(
        session_id="e2e", profile="untrusted", agent=None, project=str(proj),
        command=argv, command_name=os.path.basename(argv[0]), allow=[], env=env,
        uid=os.getuid(), gid=os.getgid(), user="aptest", home=str(home),
        runtime_paths=[str(home.parent / "runtime")], **kw,
    )


def parse_status(raw: bytes) -> list[dict[str, object]]:
    dec = json.JSONDecoder()
    text, out, i = raw.decode(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)
        out.append(obj)
    return out


def run_jail(
    policy: SessionPolicy, stdin: bytes = b"", runner_args: tuple[str, ...] = (),
) -> tuple[int, str, str, list]:
    covers = jail_covers(policy)
    r, w = os.pipe()
    try:
        p = subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps(policy.to_json()), str(w), *runner_args],
            pass_fds=(w,), env=host_env(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        os.close(w)
        try:
            out, err = p.communicate(stdin, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()  # the runner is bwrap by now: its sandbox follows (--die-with-parent)
            p.communicate()
            raise
        status = parse_status(os.read(r, 1 << 16))
    finally:
        os.close(r)
        left = remove_placeholders(covers)
    assert left == [], f"placeholders left in the project: {left}"
    return p.returncode, out.decode(), err.decode(), status


def sh(policy_home: Path, proj: Path, script: str, **kw: Any) -> tuple[int, str, str]:
    rc, out, err, _ = run_jail(make_policy(policy_home, proj, ["/bin/sh", "-c", script], **kw))
    return rc, out, err


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            out[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns)
    return out


# -- filesystem ----------------------------------------------------------------------


def test_home_secrets_and_siblings_invisible_project_writable(tmp_path: Path) -> None:
    home, proj = make_world(tmp_path)
    before = snapshot(tmp_path, skip=proj)
    marker = f"agentpen-e2e-{os.getpid()}-{time.monotonic_ns()}"
    script = f"""
        cat ~/.ssh/id_x 2>/dev/null && echo LEAK-SSH
        ls ~/sibling 2>/dev/null && echo LEAK-SIBLING
        cat {home}/sibling/notes.txt 2>/dev/null && echo LEAK-SIBLING2
        ls -A ~ | tr '\\n' ' '; echo
        cat README                                    # control: project readable
        echo made > new-file && echo WROTE-PROJECT    # control: project writable
        echo x > ~/in-home && echo WROTE-HOME         # the tmpfs home is writable
        echo x > /tmp/{marker} && echo WROTE-TMP
        echo x > /usr/agentpen-x 2>/dev/null && echo LEAK-USR
        echo x > /etc/agentpen-x 2>/dev/null && echo LEAK-ETC
        ls /etc/shadow 2>/dev/null && echo LEAK-SHADOW
        cat /etc/resolv.conf /etc/hosts
        grep '^hosts:' /etc/nsswitch.conf
        hostname
    """
    rc, out, err = sh(home, proj, script)
    assert rc == 0, err
    assert "LEAK" not in out, out
    for ok in ("hello", "WROTE-PROJECT", "WROTE-HOME", "WROTE-TMP"):
        assert ok in out
    assert "nameserver 127.0.0.1" in out and "options timeout:1 attempts:1" in out
    assert "hosts: files dns" in out and "agentpen" in out
    # home listing shows only the path down to the project
    assert out.splitlines()[0].split() == ["src"]
    # Host side: the project has the new file, nothing else changed anywhere.
    assert (proj / "new-file").read_text() == "made\n"
    assert snapshot(tmp_path, skip=proj) == before
    assert not (home / "in-home").exists()
    assert not Path("/tmp", marker).exists()
    assert sorted(p.name for p in proj.iterdir()) == [".git", "README", "new-file"]


def test_mounts_ro_and_rw_and_refusal(tmp_path: Path) -> None:
    home, proj = make_world(tmp_path)
    cfg = home / ".claude"
    cfg.mkdir()
    tool = tmp_path / "tool"
    tool.mkdir()
    (tool / "t.txt").write_text("tool\n")
    rc, out, err = sh(home, proj, f"""
        echo state > {cfg}/s && echo WROTE-CFG
        cat {tool}/t.txt; (echo x > {tool}/u) 2>/dev/null && echo LEAK-RO
        true
    """, mounts=[Mount(str(cfg), "rw", "agent config"), Mount(str(tool), "ro", "tool")])
    assert rc == 0, err
    assert "WROTE-CFG" in out and "tool" in out and "LEAK" not in out
    assert (cfg / "s").read_text() == "state\n" and not (tool / "u").exists()
    # Refused in the jail worker, before bwrap: it exits with the reason.
    rc, out, err, status = run_jail(
        make_policy(home, proj, ["/bin/true"], mounts=[Mount(str(home), "ro")]))
    assert rc != 0 and "would expose the home directory" in err and status == []


def test_persistence_paths_protected_git_commit_works(tmp_path: Path) -> None:
    home, proj = make_world(tmp_path)
    hooks_before = sorted(p.name for p in (proj / ".git" / "hooks").iterdir())
    config_before = (proj / ".git" / "config").read_text()
    attacks = {
        "hook": "echo evil > .git/hooks/post-checkout",
        "hook-existing": "echo evil >> .git/hooks/pre-commit.sample",
        "config": "git config core.fsmonitor 'touch /tmp/pwned'",
        "config-direct": "echo '[core] fsmonitor = x' >> .git/config",
        "modules": "mkdir -p .git/modules/x",
        "gitmodules": "echo '[submodule]' > .gitmodules",
        "envrc": "echo evil > .envrc",
        "vscode": "mkdir -p .vscode && echo {} > .vscode/tasks.json",
        "vscode-file": "echo {} > .vscode/tasks.json",
        "mcp": "echo '{\"mcpServers\":{}}' > .mcp.json",
        "claude": "mkdir -p .claude && echo {} > .claude/settings.json",
        "swap-git": "mv .git .git-old",
        "swap-hooks": "mv .git/hooks .git/hooks-old",
        "rm-envrc": "rm -f .envrc",
    }
    script = "\n".join(
        f"( {cmd} ) 2>/dev/null && echo BYPASS-{name}" for name, cmd in attacks.items()
    )
    script += """
        cat .mcp.json
        echo change >> README && echo feature > feat.txt
        git add README feat.txt && git -c user.name=a -c user.email=a@x commit -qm sandboxed \
            && echo COMMITTED
    """
    rc, out, err = sh(home, proj, script)
    assert rc == 0, err
    assert "BYPASS" not in out, out
    assert "COMMITTED" in out, err
    assert "{}" in out  # a missing .json reads as an inert empty object
    # Host side: the commit is there; nothing protected changed; no placeholder left.
    log = subprocess.run(["git", "-C", str(proj), "log", "--format=%s"], capture_output=True,
                         text=True, check=True, timeout=TIMEOUT).stdout.split()
    assert log == ["sandboxed", "init"]
    assert sorted(p.name for p in (proj / ".git" / "hooks").iterdir()) == hooks_before
    assert (proj / ".git" / "config").read_text() == config_before
    assert sorted(p.name for p in proj.iterdir()) == [".git", "README", "feat.txt"]
    assert not (proj / ".git" / "modules").exists()


def test_persistence_control_unprotected_path_is_writable(tmp_path: Path) -> None:
    """Control: lifting a protection (--unprotect .envrc) makes the same write succeed, so
    the refusal above is the cover's doing, not a broken probe."""
    home, proj = make_world(tmp_path)
    rc, out, err = sh(home, proj, "echo ok > .envrc && echo WROTE", unprotect=[".envrc"])
    assert rc == 0 and "WROTE" in out, err
    assert (proj / ".envrc").read_text() == "ok\n"


# -- process confinement ---------------------------------------------------------------

PROBE = textwrap.dedent(r"""
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    NR = dict(ptrace=101, keyctl=250, unshare=272, io_uring_setup=425, mount=165,
              ioctl=16, clone3=435, personality=135, bpf=321, getpid=39)

    def sc(name, *args):
        ctypes.set_errno(0)
        conv = [ctypes.c_void_p(a) if isinstance(a, (bytes, type(None))) else ctypes.c_long(a)
                for a in args]
        r = libc.syscall(ctypes.c_long(NR[name]), *conv)
        return 0 if r >= 0 else ctypes.get_errno()

    def in_child(fn):
        pid = os.fork()
        if pid == 0:
            os._exit(fn())
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    res = {}
    res["getpid"] = sc("getpid")
    res["ptrace"] = in_child(lambda: sc("ptrace", 0, 0, 0, 0))  # PTRACE_TRACEME
    res["keyctl"] = sc("keyctl", 0, -4 & 0xFFFFFFFF, 0)  # GET_KEYRING_ID(USER_KEYRING)
    res["unshare_user"] = in_child(lambda: sc("unshare", 0x10000000))
    params = ctypes.create_string_buffer(120)
    r = sc("io_uring_setup", 1, ctypes.addressof(params))
    res["io_uring"] = r
    import tempfile
    bufs = [ctypes.create_string_buffer(x)
            for x in (b"none", tempfile.mkdtemp().encode(), b"tmpfs")]
    res["mount"] = sc("mount", *(ctypes.addressof(b) for b in bufs), 0, 0)
    res["clone3"] = sc("clone3", 0, 0)
    res["personality"] = in_child(lambda: sc("personality", 0x0040000))
    if os.isatty(0):
        c = ctypes.c_char(b"#")
        res["tiocsti"] = sc("ioctl", 0, 0x5412, ctypes.addressof(c))
        res["tiocsti_hi"] = sc("ioctl", 0, 0x5412 | (1 << 32), ctypes.addressof(c))
        ws = ctypes.create_string_buffer(8)
        res["tiocgwinsz"] = sc("ioctl", 0, 0x5413, ctypes.addressof(ws))
    print("PROBE " + json.dumps(res), flush=True)
""")
EPERM, EIO, ENOSYS = 1, 5, 38


def probe_results(text: str) -> dict[str, int]:
    # Under a pty, the host control's injected "#" characters precede the line.
    line = next(x for x in text.splitlines() if "PROBE " in x)
    return json.loads(line[line.index("PROBE ") + 6 :])


def test_seccomp_refuses_attacks_with_controls(tmp_path: Path) -> None:
    # Controls on the host (no jail): each probe works there.
    host = subprocess.run([PY, "-c", PROBE], capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    h = probe_results(host.stdout)
    assert h["getpid"] == 0 and h["ptrace"] == 0 and h["keyctl"] == 0
    assert h["unshare_user"] == 0 and h["personality"] == 0 and h["io_uring"] == 0
    assert h["clone3"] != ENOSYS  # EINVAL on the host: the syscall exists
    mnt = subprocess.run(["unshare", "-Urm", PY, "-c", PROBE], capture_output=True, text=True,
                         timeout=TIMEOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert probe_results(mnt.stdout)["mount"] == 0  # mount works where one may mount
    # In the jail:
    home, proj = make_world(tmp_path)
    rc, out, err, _ = run_jail(make_policy(home, proj, [PY, "-c", PROBE]))
    assert rc == 0, err
    j = probe_results(out)
    assert j["getpid"] == 0  # control: the probe itself runs
    for k in ("ptrace", "keyctl", "unshare_user", "io_uring", "mount", "personality"):
        assert j[k] == EPERM, (k, j)
    assert j["clone3"] == ENOSYS


def test_status_seccomp_caps_nnp_and_nested_userns(tmp_path: Path) -> None:
    home, proj = make_world(tmp_path)
    ctl = subprocess.run(["unshare", "-U", "true"], capture_output=True, timeout=TIMEOUT)
    assert ctl.returncode == 0  # control: the host allows user namespaces
    rc, out, err = sh(home, proj, """
        grep -E '^(Seccomp|CapEff|CapPrm|CapBnd|NoNewPrivs):' /proc/self/status
        unshare -U true 2>/dev/null && echo NESTED-USERNS
        echo PIDS $(ls /proc | grep -c '^[0-9]')
    """)
    assert rc == 0, err
    fields = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
    assert fields["Seccomp"] == "2" and fields["NoNewPrivs"] == "1"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    assert int(fields["CapBnd"], 16) == 0
    assert "NESTED-USERNS" not in out
    assert int(out.split("PIDS ")[1].split()[0]) < 10  # own pid namespace


def test_x32_abi_is_killed(tmp_path: Path) -> None:
    code = ("import ctypes; l = ctypes.CDLL(None); l.syscall.restype = ctypes.c_long;"
            "print('NATIVE', l.syscall(39), flush=True);"
            "print('X32', l.syscall(0x40000000 | 39), flush=True)")
    home, proj = make_world(tmp_path)
    rc, out, _, status = run_jail(make_policy(home, proj, [PY, "-c", code]))
    assert "NATIVE" in out  # control: the native call runs
    assert "X32" not in out
    assert rc == 128 + signal.SIGSYS
    assert status[-1].get("exit-code") == 128 + signal.SIGSYS


# -- environment -------------------------------------------------------------------------


def test_env_scrubbed_and_pid1_environ_clean(tmp_path: Path) -> None:
    home, proj = make_world(tmp_path)
    rc, out, err = sh(home, proj, "env; echo ---; tr '\\0' '\\n' < /proc/1/environ")
    assert rc == 0, err
    env_part, pid1 = out.split("---\n")
    assert CANARY not in out
    assert "SSH_AUTH_SOCK" not in out and "CANARY_TOKEN" not in out
    assert "ANTHROPIC_API_KEY=sk-ant-dummy" in env_part  # passthrough works
    assert f"HOME={home}" in pid1  # control: /proc/1/environ is readable and real


# -- exit codes and signals ----------------------------------------------------------------


@pytest.mark.parametrize("script,code", [("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 143),
                                         ("kill -KILL $$", 137)])
def test_exit_codes_propagate(tmp_path: Path, script: str, code: int) -> None:
    home, proj = make_world(tmp_path)
    rc, _, err, status = run_jail(make_policy(home, proj, ["/bin/sh", "-c", script]))
    assert rc == code, err
    assert status[0].get("child-pid") and status[-1].get("exit-code") == code


def test_signals_reset_whatever_the_parent_left(tmp_path: Path) -> None:
    """A parent that ignores CHLD/TERM and blocks INT/TERM must not leak that into
    bwrap or the command: statuses and signal deaths still propagate."""
    home, proj = make_world(tmp_path)
    script = "grep -E '^Sig(Blk|Ign):' /proc/self/status; kill -TERM $$"
    rc, out, err, status = run_jail(make_policy(home, proj, ["/bin/sh", "-c", script]),
                                    runner_args=("hostile-parent",))
    assert rc == 143, err
    assert status[-1].get("exit-code") == 143
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert int(fields["SigBlk"], 16) == 0
    ignored = int(fields["SigIgn"], 16)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGUSR1):
        assert not ignored & (1 << (sig - 1)), sig


def test_kill_process_group_cannot_reach_the_parent(tmp_path: Path) -> None:
    """A stand-in supervisor starts the jail worker; `kill -KILL 0` inside must not
    reach the stand-in. Control: the same command run directly kills it."""
    home, proj = make_world(tmp_path)
    pol = make_policy(home, proj, ["/bin/sh", "-c", "kill -KILL 0"])
    standin = textwrap.dedent("""
        import os, subprocess, sys
        p = subprocess.run(sys.argv[1:], close_fds=False)
        print("STANDIN-ALIVE", p.returncode, flush=True)
    """)
    r, w = os.pipe()
    try:
        jailed = subprocess.run(
            [sys.executable, "-c", standin, sys.executable, "-c", RUNNER,
             json.dumps(pol.to_json()), str(w)],
            pass_fds=(w,), capture_output=True, text=True, timeout=TIMEOUT,
            start_new_session=True,
        )
    finally:
        os.close(w)
        os.close(r)
        remove_placeholders(jail_covers(pol))
    # The stand-in lives on; the jail's own group (bwrap included) is what died.
    assert jailed.returncode == 0, jailed.stderr
    assert "STANDIN-ALIVE -9" in jailed.stdout, (jailed.stdout, jailed.stderr)
    direct = subprocess.run([sys.executable, "-c", standin, "/bin/sh", "-c", "kill -KILL 0"],
                            capture_output=True, text=True, timeout=TIMEOUT,
                            start_new_session=True)
    assert direct.returncode == -signal.SIGKILL and "STANDIN-ALIVE" not in direct.stdout


# -- under a pseudo-terminal ------------------------------------------------------------------


class Pty:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is our controlling terminal
            try:
                os.execve(argv[0], argv, env)  # noqa: S606 - test child, fixed argv
            finally:
                os._exit(127)
        self.buf = b""

    def expect(self, token: bytes, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while token not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timeout waiting for {token!r}; got {self.buf!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the other side closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"EOF waiting for {token!r}; got {self.buf!r}")
                self.buf += chunk
        return self.buf

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(st)
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                with contextlib.suppress(OSError):  # EIO once the child side closed
                    self.buf += os.read(self.fd, 4096)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"child did not exit; output {self.buf!r}")


def pty_jail(policy: SessionPolicy) -> tuple[Pty, int]:
    r, w = os.pipe()
    os.set_inheritable(w, True)
    t = Pty([sys.executable, "-c", RUNNER, json.dumps(policy.to_json()), str(w)], host_env())
    os.close(w)
    return t, r


def test_tiocsti_refused_under_pty_with_controls(tmp_path: Path) -> None:
    # Control: on the host, under a pty, TIOCSTI works (with and without high bits).
    host = Pty([PY, "-c", PROBE], dict(os.environ))
    host.expect(b"PROBE ")
    assert host.wait() == 0
    h = probe_results(host.buf.decode(errors="replace").replace("\r", ""))
    # (0 = injected; EIO where dev.tty.legacy_tiocsti=0: still not seccomp's EPERM)
    assert h["tiocsti"] in (0, EIO) and h["tiocsti_hi"] in (0, EIO) and h["tiocgwinsz"] == 0
    home, proj = make_world(tmp_path)
    pol = make_policy(home, proj, [PY, "-c", PROBE])
    covers = jail_covers(pol)
    t, r = pty_jail(pol)
    try:
        t.expect(b"PROBE ")
        assert t.wait() == 0
    finally:
        os.close(r)
        remove_placeholders(covers)
    j = probe_results(t.buf.decode(errors="replace").replace("\r", ""))
    assert j["tiocgwinsz"] == 0  # a permitted ioctl on the same tty works
    assert j["tiocsti"] == EPERM and j["tiocsti_hi"] == EPERM


CTRL_C_APP = textwrap.dedent(r"""
    import signal, sys, os, fcntl, termios, struct
    def on_int(*_):
        os.write(1, b"GOT-INT\n")  # os.write: print is not reentrant in a handler
    def on_winch(*_):
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))[:2]
        os.write(1, f"WINCH {rows}x{cols}\n".encode())
    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGWINCH, on_winch)
    print("READY", os.getpgrp() == os.tcgetpgrp(0), flush=True)
    line = sys.stdin.readline()
    print("STILL-HERE", line.strip(), flush=True)
    sys.exit(42)
""")


def test_ctrl_c_and_resize_reach_the_command_and_sandbox_survives(tmp_path: Path) -> None:
    home, proj = make_world(tmp_path)
    pol = make_policy(home, proj, [PY, "-c", CTRL_C_APP])
    covers = jail_covers(pol)
    t, r = pty_jail(pol)
    try:
        t.expect(b"READY True")  # the command is the terminal's foreground group
        os.write(t.fd, b"\x03")
        t.expect(b"GOT-INT")
        fcntl.ioctl(t.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        t.expect(b"WINCH 33x111")
        os.write(t.fd, b"go on\n")
        t.expect(b"STILL-HERE go on")
        rc = t.wait()
        status = parse_status(os.read(r, 1 << 16))
    finally:
        os.close(r)
        remove_placeholders(covers)
    assert rc == 42
    assert status[-1].get("exit-code") == 42


def test_ctrl_c_default_kills_command_with_130(tmp_path: Path) -> None:
    """Control for the above: a command that does not trap INT dies of it, and the
    exit status says so (128 + SIGINT)."""
    home, proj = make_world(tmp_path)
    app = "import sys; print('READY', flush=True); sys.stdin.readline()"
    pol = make_policy(home, proj, [PY, "-c", app])
    covers = jail_covers(pol)
    t, r = pty_jail(pol)
    try:
        t.expect(b"READY")
        os.write(t.fd, b"\x03")
        rc = t.wait()
    finally:
        os.close(r)
        remove_placeholders(covers)
    assert rc == 128 + signal.SIGINT


def test_placeholders_cover_but_leave_nothing(tmp_path: Path) -> None:
    home, proj = make_world(tmp_path)
    pol = replace(make_policy(home, proj, ["/bin/sh", "-c", "ls -A; test -d .vscode"]))
    rc, out, err, _ = run_jail(pol)
    assert rc == 0, err
    assert ".envrc" in out and ".vscode" in out  # covered inside
    assert sorted(p.name for p in proj.iterdir()) == [".git", "README"]  # gone after


NESTED_RUNNER = textwrap.dedent("""
    import json, os, sys
    from agentpen.core.osutil import capability_sets, drop_all_capabilities
    from agentpen.core.policy import SessionPolicy
    from agentpen.workers.jail.launch import exec_jail
    assert os.getuid() == 0 and capability_sets()["CapEff"] != 0
    if sys.argv[3] == "dropped":  # a netns worker that dropped everything before the fork
        drop_all_capabilities()
    exec_jail(SessionPolicy.from_json(json.loads(sys.argv[1])), status_fd=int(sys.argv[2]))
""")


def test_production_chain_userns_root(tmp_path: Path) -> None:
    """The real chain: the jail worker is uid 0 in pasta's user+net namespace;
    exec_jail keeps only CAP_SETFCAP for bwrap (needed to map the user's uid onto
    uid 0), and the sandbox ends with none. `unshare -rn` stands in for pasta."""
    home, proj = make_world(tmp_path)
    pol = make_policy(home, proj, ["/bin/sh", "-c", """
        id -u; grep -E '^(Seccomp|CapEff):' /proc/self/status
        echo ok > written && echo WROTE
        cat ~/.ssh/id_x 2>/dev/null && echo LEAK
        unshare -U true 2>/dev/null && echo NESTED
        ls /sys/class/net 2>/dev/null; true
    """])
    covers = jail_covers(pol)
    r, w = os.pipe()
    try:
        p = subprocess.run(
            ["unshare", "-rn", "--", sys.executable, "-c", NESTED_RUNNER,
             json.dumps(pol.to_json()), str(w), "kept"],
            pass_fds=(w,), env=host_env(), capture_output=True, text=True, timeout=TIMEOUT,
        )
        os.close(w)
        status = parse_status(os.read(r, 1 << 16))
    finally:
        os.close(r)
        left = remove_placeholders(covers)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    assert lines[0] == str(os.getuid())  # the user's own uid inside, as on the host
    assert "Seccomp:" in p.stdout and "2" in lines and "WROTE" in p.stdout
    assert "CapEff:\t0000000000000000" in p.stdout
    assert "LEAK" not in p.stdout and "NESTED" not in p.stdout
    assert (proj / "written").read_text() == "ok\n"
    assert (proj / "written").stat().st_uid == os.getuid()
    assert status[-1].get("exit-code") == 0 and left == []


def test_production_chain_fails_closed_without_setfcap(tmp_path: Path) -> None:
    home, proj = make_world(tmp_path)
    pol = make_policy(home, proj, ["/bin/true"])
    r, w = os.pipe()
    try:
        p = subprocess.run(
            ["unshare", "-rn", "--", sys.executable, "-c", NESTED_RUNNER,
             json.dumps(pol.to_json()), str(w), "dropped"],
            pass_fds=(w,), env=host_env(), capture_output=True, text=True, timeout=TIMEOUT,
        )
    finally:
        os.close(w)
        os.close(r)
    assert p.returncode != 0
    assert "JailCapsError" in p.stderr and "CAP_SETFCAP" in p.stderr
