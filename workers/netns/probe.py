"""pasta's feature probes (``pasta --help``, ``--version``) started early, read later.

Kept apart from pasta.py so that the CLI can start them before importing anything else
(issue 10): this module needs only ``os``, ``subprocess`` and ``core.which``. The probes
run while the supervisor imports and parses; ``pasta.detect_features`` reads them.
Best effort: a probe that could not start, or was killed, is met again (and reported)
by ``detect_features``, which then probes anew.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

Key = tuple[str, int, int]  # (path, mtime, size): a binary replaced in place is probed again
Probe = tuple[str, "subprocess.Popen[str] | None", "BaseException | None"]
_started: dict[Key, list[Probe]] = {}


def resolve(pasta_path: str) -> tuple[str, Key]:
    """The absolute path to run and its cache key; LookupError when there is no pasta.

    Never realpath(): pasta is a symlink to passt, which picks its mode from argv[0];
    stat() follows the link for the key."""
    from agentpen.core.which import which

    found = which(pasta_path) or which(pasta_path, path="/usr/bin:/usr/sbin:/bin:/sbin")
    if found is None:
        raise LookupError(pasta_path)
    found = os.path.abspath(found)
    st = os.stat(found)
    return found, (found, st.st_mtime_ns, st.st_size)


def start(resolved: str) -> list[Probe]:
    """Both probes at once (each is a fork and exec of pasta)."""
    procs: list[Probe] = []
    for flag in ("--help", "--version"):
        try:
            procs.append((flag, subprocess.Popen(
                [resolved, flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                stdin=subprocess.DEVNULL, restore_signals=True), None))
        except OSError as exc:
            procs.append((flag, None, exc))
    return procs


def start_early(pasta_path: str = "pasta") -> None:
    """Start the probes of this binary now, for ``take()`` later."""
    try:
        resolved, key = resolve(pasta_path)
    except (LookupError, OSError):
        return
    if key not in _started:
        _started[key] = start(resolved)


def take(key: Key) -> list[Probe] | None:
    return _started.pop(key, None)


def discard() -> None:
    """Probes started and never read (the run ended before pasta): reap them."""
    while _started:
        _, procs = _started.popitem()
        for _flag, proc, _failed in procs:
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.communicate()
