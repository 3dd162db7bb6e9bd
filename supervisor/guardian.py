"""A tiny process that cleans up after a supervisor that was SIGKILLed.

PDEATHSIG takes the workers down with the supervisor, but three things survive a `kill -9`
of the supervisor itself: the empty protection placeholders bwrap needed as mount points
in the project, the scratch directories behind writable covers, and a child pasta forks
while it builds the namespace (it is not covered by pasta's PDEATHSIG).

The guardian is forked *before* pasta exists and blocks on a pipe whose only write end
the supervisor holds. Pasta's own pre-exec hook writes pasta's pid into that pipe (one
write, between fork and exec), so there is no moment when pasta runs and the guardian does
not know it; the covers follow once they are planned. A clean teardown writes "release"
(the supervisor did the work itself); end-of-file means the supervisor died: the guardian
kills pasta's whole process group, removes the placeholders and the scratch directory,
then exits. It ignores the terminal's and the shell's signals so that it outlives exactly
the supervisor.

Messages on the pipe: b"P" + pid (8 bytes, little endian); b"C" + length (4 bytes) +
JSON {"covers": [[path, kind, rel, source], ...], "scratch_root": str | null}; b"R".
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import struct
from collections.abc import Sequence

# Imported here, before any fork: the child must not import (another thread of the
# supervisor may hold the import lock at fork time).
from agentpen.core.osutil import close_fds_except, set_name
from agentpen.workers.jail.protect import Cover, remove_placeholders


class Guardian:
    def __init__(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the guardian
            try:
                os.close(w)
                _guard(r)
            finally:
                os._exit(0)
        os.close(r)
        self.pid, self._w = pid, w
        self.released = False

    def announce_self(self) -> None:
        """Called in pasta's child between fork and exec: names it to the guardian
        (one write of 9 bytes: atomic on a pipe, async-signal-safe)."""
        os.write(self._w, b"P" + struct.pack("<q", os.getpid()))

    def watch(self, covers: Sequence[Cover], scratch_root: str | None) -> None:
        """What to remove if we die: the placeholders and the scratch directory."""
        body = json.dumps({"covers": [[c.path, c.kind, c.rel, c.source] for c in covers],
                           "scratch_root": scratch_root}).encode()
        _write_all(self._w, b"C" + struct.pack("<I", len(body)) + body)

    def release(self) -> None:
        """The supervisor cleaned up itself: the guardian exits without acting."""
        if self.released:
            return
        self.released = True
        with contextlib.suppress(OSError):
            os.write(self._w, b"R")
        with contextlib.suppress(OSError):
            os.close(self._w)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Orders:
    """Sans-IO reader of the pipe's messages."""

    def __init__(self) -> None:
        self.buf = b""
        self.pgid: int | None = None
        self.covers: list[Cover] = []
        self.scratch_root: str | None = None
        self.released = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            kind = self.buf[:1]
            if kind == b"P" and len(self.buf) >= 9:
                self.pgid = struct.unpack("<q", self.buf[1:9])[0]
                self.buf = self.buf[9:]
            elif kind == b"C" and len(self.buf) >= 5:
                n = struct.unpack("<I", self.buf[1:5])[0]
                if len(self.buf) < 5 + n:
                    return
                body = json.loads(self.buf[5 : 5 + n])
                self.covers = [Cover(p, k, r, source=s) for p, k, r, s in body["covers"]]
                self.scratch_root = body["scratch_root"]
                self.buf = self.buf[5 + n :]
            elif kind == b"R":
                self.released = True
                self.buf = b""
            elif kind in (b"P", b"C"):
                return  # incomplete: wait for the rest
            else:  # not ours: never act on garbage, but still clean up on EOF
                self.buf = b""


def _guard(r: int) -> None:
    gc.enable()  # off in the supervisor until "go" (cli._main); this process lives as long
    with contextlib.suppress(OSError):
        set_name(b"agentpen-guard")
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGTSTP,
                signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    close_fds_except({r})
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # never hold the user's terminal
        os.dup2(devnull, fd)
    orders = _Orders()
    while not orders.released:
        try:
            data = os.read(r, 65536)
        except InterruptedError:
            continue
        if not data:
            break
        orders.feed(data)
    if orders.released:
        return
    if orders.pgid is not None:  # pasta runs in its own process group (pgid = its pid)
        with contextlib.suppress(OSError):
            os.killpg(orders.pgid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        remove_placeholders(orders.covers)
    if orders.scratch_root:  # what the agent wrote under scratch covers: never kept
        import shutil

        shutil.rmtree(orders.scratch_root, ignore_errors=True)


