"""A tiny process that cleans up after a supervisor that was SIGKILLed.

PDEATHSIG takes the workers down with the supervisor, but two things survive a `kill -9`
of the supervisor itself: the empty protection placeholders bwrap needed as mount points
in the project (and the scratch directories behind writable covers), and a child pasta
forks while it builds the namespace (it is not covered by pasta's PDEATHSIG). The guardian
is forked before the sandbox can run; it blocks on a pipe whose only write end the
supervisor holds. A clean teardown writes one byte (the
supervisor did the work itself); end-of-file means the supervisor died: the guardian kills
pasta's whole process group and removes the placeholders, then exits. It ignores the
terminal's and the shell's signals so that it outlives exactly the supervisor."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Sequence
from typing import Any

# Imported here, before any fork: the child must not import (another thread of the
# supervisor may hold the import lock at fork time).
from agentpen.core.osutil import close_fds_except
from agentpen.workers.jail.protect import remove_placeholders


class Guardian:
    def __init__(self, pasta_pgid: int, covers: Sequence[Any], scratch_root: str | None = None) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the guardian
            try:
                os.close(w)
                _guard(r, pasta_pgid, covers, scratch_root)
            finally:
                os._exit(0)
        os.close(r)
        self.pid, self._w = pid, w

    def release(self) -> None:
        """The supervisor cleaned up itself: the guardian exits without acting."""
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")
        with contextlib.suppress(OSError):
            os.close(self._w)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, 0)


def _guard(r: int, pasta_pgid: int, covers: Sequence[Any], scratch_root: str | None) -> None:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGTSTP,
                signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    close_fds_except({r})
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # never hold the user's terminal
        os.dup2(devnull, fd)
    while True:
        try:
            released = os.read(r, 1)
            break
        except InterruptedError:
            continue
    if released:
        return
    with contextlib.suppress(OSError):
        os.killpg(pasta_pgid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        remove_placeholders(covers)
    if scratch_root:  # what the agent wrote under scratch covers: never kept
        shutil.rmtree(scratch_root, ignore_errors=True)
