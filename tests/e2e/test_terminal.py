"""Issues 2 and 6: under a real pseudo-terminal, Ctrl-C and window resizes reach the
command as they would without agentpen, the session survives a command that handles
SIGINT (bwrap's monitor must not die of it), and the exit status propagates."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import shutil
import struct
import termios
import time

import pytest


def _read_until(fd: int, needle: bytes, buf: bytearray, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {needle!r}; got {bytes(buf)[-400:]!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"terminal closed before {needle!r}; got {bytes(buf)[-400:]!r}"
            buf += chunk


def _spawn_in_pty(argv: list[str], env: dict, cwd) -> tuple[int, int]:
    pid, master = pty.fork()
    if pid == 0:  # child: the pty is our controlling terminal, we lead its foreground group
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)  # noqa: S606 - exec is the point
        finally:
            os._exit(127)
    return pid, master


@pytest.fixture
def bash():
    path = shutil.which("bash")
    if not path:
        pytest.fail("bash is needed for the terminal tests")
    return path


def test_ctrl_c_and_resize_reach_the_command_and_the_session_survives(sandbox, bash):
    done = sandbox.project / "done"
    script = (
        'trap \'echo "got-INT"\' INT; trap \'echo "got-WINCH $(stty size)"\' WINCH; '
        f'echo ready; while [ ! -e {done} ]; do sleep 0.05; done; echo bye; exit 3'
    )
    argv = sandbox.argv("--", bash, "-c", script, audit=sandbox.root / "pty.jsonl")
    pid, master = _spawn_in_pty(argv, sandbox.env(TERM="xterm"), sandbox.project)
    buf = bytearray()
    try:
        _read_until(master, b"ready", buf)
        os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground group
        _read_until(master, b"got-INT", buf)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 41, 117, 0, 0))
        _read_until(master, b"got-WINCH 41 117", buf)
        done.touch()
        _read_until(master, b"bye", buf)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(master)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, (status, bytes(buf)[-400:])


def test_ctrl_c_ends_a_command_that_does_not_handle_it_with_130(sandbox, bash):
    argv = sandbox.argv("--", bash, "-c", "echo ready; exec sleep 60", audit=sandbox.root / "i.jsonl")
    pid, master = _spawn_in_pty(argv, sandbox.env(TERM="xterm"), sandbox.project)
    buf = bytearray()
    try:
        _read_until(master, b"ready", buf)
        os.write(master, b"\x03")
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, bytes(buf)[-400:]
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                with contextlib.suppress(OSError):
                    buf += os.read(master, 4096)
    finally:
        os.close(master)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, (status, bytes(buf)[-400:])
