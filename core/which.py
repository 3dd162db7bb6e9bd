"""``which()``: shutil.which's lookup without importing shutil, which pulls in bz2, lzma
and fnmatch (~2 ms) on the path to pasta's start (issue 10)."""

from __future__ import annotations

import os


def which(name: str, path: str | None = None) -> str | None:
    """The first executable, non-directory ``name`` on ``path`` (default: $PATH, else
    os.defpath), as shutil.which(name, path=path) finds it; a name with a slash is
    checked as it is."""
    def runnable(candidate: str) -> bool:
        return os.access(candidate, os.X_OK) and not os.path.isdir(candidate)

    if os.path.dirname(name):
        return name if runnable(name) else None
    if path is None:
        path = os.environ.get("PATH")
        if path is None:
            try:
                path = os.confstr("CS_PATH")
            except (AttributeError, ValueError):
                path = os.defpath
    if not path:
        return None
    seen = set()
    for directory in path.split(os.pathsep):
        if directory in seen:
            continue
        seen.add(directory)
        candidate = os.path.join(directory, name)  # an empty entry: the current directory
        if runnable(candidate):
            return candidate
    return None
