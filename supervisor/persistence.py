"""After the session: git redirections the sandbox could plant but not be stopped from
planting by a read-only bind, found on the host and quarantined.

The jail keeps `.git/config`, `.git/hooks/`, `.git/modules/` ... read-only, but two ways
to make the *host's* git run a program remain writable because git inside needs the
directories they live in:

- `.git/commondir` (a file that moves the repository's common dir, and so its config
  and hooks, to any directory the agent controls). An empty placeholder cannot cover it:
  git refuses a repository whose commondir it cannot read.
- a new nested repository (`sub/.git/config` with `core.fsmonitor`, `sub/.git/hooks/*`,
  or a `sub/.git` gitfile pointing at a directory the agent wrote): git runs it when the
  user works in `sub/` on the host.

So at teardown the supervisor walks the project and renames what was created or changed
during the session (inode change time at or after the session's start: the agent
cannot set ctime) to `NAME.agentpen-quarantine`, audits it and tells the user. Nothing is
deleted. Pure apart from the walk and the renames."""

from __future__ import annotations

import os
import time

from agentpen.core.record import record

SUFFIX = ".agentpen-quarantine"
# The filesystem stamps inodes with a coarse clock (a jiffy behind the real one):
# a file written just after the session started can carry a slightly earlier ctime.
CLOCK_SLACK_NS = 50_000_000
WALK_BUDGET_S = 20.0


@record(frozen=True)
class Finding:
    path: str
    why: str
    quarantined_to: str | None = None
    error: str | None = None


def _changed_since(path: str, since_ns: int) -> bool:
    try:
        return os.lstat(path).st_ctime_ns >= since_ns - CLOCK_SLACK_NS
    except OSError:
        return False


def _nested_git_findings(gitdir: str, since_ns: int) -> list[tuple[str, str]]:
    out = []
    for name, why in (("config", "a nested repository's config (core.fsmonitor, hooksPath, "
                                 "filters run programs)"),
                      ("commondir", "redirects a nested repository's config and hooks"),
                      ("hooks", "a nested repository's hooks run on the host")):
        p = os.path.join(gitdir, name)
        if name == "hooks" and os.path.isdir(p) and not os.path.islink(p):
            for entry in os.scandir(p):
                if not entry.name.endswith(".sample") and _changed_since(entry.path, since_ns):
                    out.append((entry.path, why))
        elif _changed_since(p, since_ns):
            out.append((p, why))
    return out


def scan(project: str, since_ns: int, *,
         budget_s: float = WALK_BUDGET_S) -> tuple[list[tuple[str, str]], bool]:
    """(findings as (path, why), complete?) for what the session planted."""
    found: list[tuple[str, str]] = []
    top_git = os.path.join(project, ".git")
    if _changed_since(os.path.join(top_git, "commondir"), since_ns):
        found.append((os.path.join(top_git, "commondir"),
                      "redirects the repository's common dir (its config and hooks) elsewhere"))
    deadline = time.monotonic() + budget_s
    for root, dirs, files in os.walk(project, followlinks=False):
        if time.monotonic() > deadline:
            return found, False
        if ".git" in dirs:
            dirs.remove(".git")  # never descend into a repository's internals
            gitdir = os.path.join(root, ".git")
            if gitdir != top_git:
                found += _nested_git_findings(gitdir, since_ns)
        if ".git" in files and root != project:
            gitfile = os.path.join(root, ".git")
            if _changed_since(gitfile, since_ns):
                found.append((gitfile, "a gitfile: points git at a directory the sandbox wrote"))
    return found, True


def quarantine(path: str) -> str:
    """Rename `path` aside (never delete). Returns the new path."""
    target = path + SUFFIX
    n = 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}{SUFFIX}.{n}"
    os.rename(path, target)
    return target


def scan_and_quarantine(project: str, since_ns: int) -> tuple[list[Finding], bool]:
    findings, complete = scan(project, since_ns)
    out = []
    for path, why in findings:
        try:
            out.append(Finding(path, why, quarantine(path)))
        except OSError as exc:
            out.append(Finding(path, why, None, exc.strerror or str(exc)))
    return out, complete
