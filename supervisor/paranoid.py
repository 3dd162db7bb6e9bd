"""The paranoid profile's host side: the throwaway project, private agent config,
resource caps, and the apply/discard step at the end.

Why a copy and not overlayfs: bwrap 0.8 has no --overlay, and an overlay mounted by
agentpen would have to be mounted in the mount namespace bwrap builds the sandbox
from. That is the netns worker's, where by the time the jail starts every process is
uid 0 of a user namespace with no CAP_SYS_ADMIN left (the jail keeps only
CAP_SETFCAP, for bwrap's uid map). Mounting it there would need a fresh user
namespace between the jail worker and bwrap, which changes the uid-mapping chain the
jail relies on. A copy (`cp -a --reflink=auto`: copy-on-write clones on btrfs/XFS,
a plain copy elsewhere) needs no privilege, no mount, and gives the same promise:
nothing reaches the real project until the user applies the changes. Its cost is
the copy time and space of the project, printed at the start.

The copy lives in $XDG_STATE_HOME/agentpen/sessions/<session-id>/project (0700), an
agentpen runtime path the sandbox can never mount except as this bind; bwrap binds it
at the real project's path, so the agent sees the path it expects.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
from collections.abc import Iterable

from agentpen.core.policy import Mount, SessionPolicy
from agentpen.core.record import field, record, replace
from agentpen.supervisor.errors import SetupFailed, UsageError

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

DEFAULTS = {"memory": "8G", "max_procs": 512, "cpu_time": "2h", "wall_time": "4h"}
WALL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when the wall clock runs out

_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B?)?$", re.I)
_DUR = re.compile(r"^(\d+)(s|m|h|d)?$")


def parse_size(text: str, what: str = "--memory") -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"{what} {text!r}: expected a size like 512M, 4G")
    n = int(m.group(1))
    if m.group(2):
        n *= 1024 ** ("KMGT".index(m.group(2).upper()) + 1)
    if n < 64 * 1024 * 1024:
        raise UsageError(f"{what} {text!r}: below 64M nothing starts")
    return n


def parse_duration(text: str, what: str) -> int:
    m = _DUR.match(text.strip())
    if not m:
        raise UsageError(f"{what} {text!r}: expected a duration like 90s, 30m, 4h, 1d")
    n = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
    if n <= 0:
        raise UsageError(f"{what} {text!r}: must be positive")
    return n


@record
class Limits:
    memory: int | None = None  # bytes, RLIMIT_DATA of every process
    max_procs: int | None = None  # RLIMIT_NPROC
    cpu_time: int | None = None  # seconds, RLIMIT_CPU of every process
    wall_time: int | None = None  # seconds, the supervisor's timer

    def rlimits(self) -> dict[str, int]:
        out = {}
        if self.memory:
            out["data"] = self.memory
        if self.max_procs:
            out["nproc"] = self.max_procs
        if self.cpu_time:
            out["cpu"] = self.cpu_time
        return out

    def describe(self) -> dict[str, str]:
        d: dict[str, str] = {}
        if self.memory:
            d["memory"] = f"{self.memory // (1024 * 1024)}M per process (RLIMIT_DATA)"
        if self.max_procs:
            d["max_procs"] = f"{self.max_procs} (RLIMIT_NPROC)"
        if self.cpu_time:
            d["cpu_time"] = f"{self.cpu_time}s per process (RLIMIT_CPU)"
        if self.wall_time:
            d["wall_time"] = f"{self.wall_time}s (SIGTERM, SIGKILL {WALL_GRACE:g}s later)"
        return d


def limits_from(opts: Any, paranoid: bool | None = None) -> Limits:
    """Flags (or config) win; the paranoid profile fills the rest with DEFAULTS."""
    if paranoid is None:
        paranoid = opts.profile == "paranoid"
    vals = {k: getattr(opts, k) for k in DEFAULTS}
    if paranoid:
        vals = {k: (v if v is not None else DEFAULTS[k]) for k, v in vals.items()}
    return Limits(
        memory=parse_size(str(vals["memory"])) if vals["memory"] is not None else None,
        max_procs=int(vals["max_procs"]) if vals["max_procs"] is not None else None,
        cpu_time=parse_duration(str(vals["cpu_time"]), "--cpu-time") if vals["cpu_time"] else None,
        wall_time=parse_duration(str(vals["wall_time"]), "--wall-time") if vals["wall_time"] else None,
    )


# -- the session directory ------------------------------------------------------------


def session_dir(state_dir: str, session_id: str) -> str:
    return os.path.join(state_dir, "sessions", session_id)


def _copy_tree(src: str, dst: str) -> None:
    """cp -a --reflink=auto: metadata, symlinks as symlinks, CoW clones when possible."""
    from agentpen.core.which import which

    cp = which("cp") or "/bin/cp"
    r = subprocess.run([cp, "-a", "--reflink=auto", "--no-target-directory", "--", src, dst],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SetupFailed(f"paranoid: copying {src} to {dst} failed: {r.stderr.strip()}",
                          fix="free space in $XDG_STATE_HOME, or use the untrusted profile")


@record
class Start:
    """Snapshots taken at the start: the real project (to spot the user's own edits
    during the session) and the fresh copy (to spot the session's)."""

    real: dict[str, Entry]
    copy: dict[str, Entry]


def prepare(policy: SessionPolicy, state_dir: str) -> tuple[SessionPolicy, str, Start]:
    """Create the session directory, copy the project and the agent's writable config
    into it, and return the policy that binds the copies in their place."""
    sdir = session_dir(state_dir, policy.session_id)
    os.makedirs(os.path.dirname(sdir), mode=0o700, exist_ok=True)
    os.mkdir(sdir, 0o700)
    os.chmod(sdir, 0o700)
    try:
        copy = os.path.join(sdir, "project")
        real_snap = snapshot(policy.project)
        _copy_tree(policy.project, copy)
        start = Start(real_snap, snapshot(copy))
        mounts: list[Mount] = []
        for i, m in enumerate(policy.mounts):
            if m.mode == "rw" and m.why != "--mount-rw" and os.path.exists(m.path):
                # Agent config: the real one is never writable in paranoid; the agent
                # writes to a private copy that is discarded with the session.
                priv = os.path.join(sdir, "config", f"{i}-{os.path.basename(m.path)}")
                os.makedirs(os.path.dirname(priv), mode=0o700, exist_ok=True)
                _copy_tree(m.path, priv)
                mounts.append(Mount(m.path, "rw", f"{m.why} (private copy; the real one is untouched)",
                                    source=priv))
            else:
                mounts.append(m)
    except BaseException:
        remove_session_dir(sdir)  # nothing ran yet: a half-made copy is of no use
        raise
    return replace(policy, project_source=copy, mounts=mounts), sdir, start


# -- the changes ------------------------------------------------------------------------


@record
class Changes:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.deleted)

    def stat(self, limit: int = 40) -> str:
        rows = ([("A", p) for p in self.added] + [("M", p) for p in self.changed]
                + [("D", p) for p in self.deleted])
        rows.sort(key=lambda r: r[1])
        lines = [f"  {k} {p}" for k, p in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"  ... and {len(rows) - limit} more")
        lines.append(f"  {len(self.added)} added, {len(self.changed)} changed, "
                     f"{len(self.deleted)} deleted")
        return "\n".join(lines)


def _walk(root: str) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full)
    return out


def _excluded(rel: str, protected: Iterable[str]) -> bool:
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in protected)


def _same(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> bool:
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
        return False
    if stat.S_ISREG(sa.st_mode):
        import filecmp  # paranoid sessions only: not on every start-up's path

        return sa.st_size == sb.st_size and filecmp.cmp(a, b, shallow=False)
    return True


Entry = tuple[int, int, int, int, str]  # (type, mode, size, mtime_ns, link target)


def entry(st: os.stat_result, path: str) -> Entry:
    """What identifies a version of a path: for files type, mode, size and mtime (cp -a
    keeps them); directories by type and mode only (their mtime moves with any entry
    added); symlinks by target."""
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return (kind, 0, 0, 0, os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        return (kind, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, "")
    return (kind, stat.S_IMODE(st.st_mode), 0, 0, "")


def snapshot(root: str) -> dict[str, Entry]:
    return {rel: entry(st, os.path.join(root, rel)) for rel, st in _walk(root).items()}


def _lentry(path: str) -> Entry | None:
    try:
        return entry(os.lstat(path), path)
    except FileNotFoundError:
        return None


def diff(real: str, copy: str, protected: Iterable[str] = (),
         start: dict[str, Entry] | None = None) -> Changes:
    """What the session changed. With `start` (the copy's snapshot taken right after
    copying): the copy now against that, so edits the user made to the real project
    meanwhile are not mistaken for the session's. Without: the copy against the real
    project. Protected paths (read-only inside, so only bwrap's placeholders can
    differ) are left out."""
    protected = list(protected)
    if start is not None:
        now = snapshot(copy)
        ch = Changes()
        for rel, e in now.items():
            if _excluded(rel, protected):
                continue
            if rel not in start:
                ch.added.append(rel)
            elif e != start[rel]:
                ch.changed.append(rel)
        for rel in start:
            if rel not in now and not _excluded(rel, protected):
                parent = os.path.dirname(rel)
                if not parent or parent in now:
                    ch.deleted.append(rel)
        for lst in (ch.added, ch.changed, ch.deleted):
            lst.sort()
        return ch
    before, after = _walk(real), _walk(copy)
    ch = Changes()
    for rel, st in after.items():
        if _excluded(rel, protected):
            continue
        if rel not in before:
            ch.added.append(rel)
        elif not stat.S_ISDIR(st.st_mode) or not stat.S_ISDIR(before[rel].st_mode):
            if not _same(os.path.join(real, rel), before[rel], os.path.join(copy, rel), st):
                ch.changed.append(rel)
        elif stat.S_IMODE(st.st_mode) != stat.S_IMODE(before[rel].st_mode):
            ch.changed.append(rel)
    for rel in before:
        if rel not in after and not _excluded(rel, protected):
            # a deleted directory's contents are deleted with it: list the top only
            parent = os.path.dirname(rel)
            if not parent or parent in after:
                ch.deleted.append(rel)
    for lst in (ch.added, ch.changed, ch.deleted):
        lst.sort()
    return ch


# What a paranoid session may change inside a git directory and have applied: the data
# a commit, a branch or a rebase writes. Anything else there (config, hooks, commondir,
# worktrees/, modules/, info/, objects/info/alternates, a .git *file* = gitfile redirect)
# can make the host's git run a program or read another repository: refused, reported,
# left in the session copy. The persistence covers protect some of these inside the
# sandbox; this list does not depend on them being complete.
GIT_DATA_DIRS = ("objects", "refs", "logs")
GIT_DATA_FILES = ("HEAD", "ORIG_HEAD", "FETCH_HEAD", "MERGE_HEAD", "MERGE_MSG", "MERGE_MODE",
                  "CHERRY_PICK_HEAD", "REVERT_HEAD", "AUTO_MERGE", "packed-refs", "index",
                  "COMMIT_EDITMSG", "description", "shallow")


def git_refusal(rel: str, copy: str) -> str | None:
    """Why a change at project-relative `rel` must not be applied, or None."""
    parts = rel.split("/")
    for i, part in enumerate(parts):
        if part != ".git":
            continue
        inner = parts[i + 1:]
        if not inner:
            full = os.path.join(copy, rel)
            if os.path.lexists(full) and not (os.path.isdir(full) and not os.path.islink(full)):
                return "a .git file or link redirects git to another directory"
            return None  # the directory itself (created or its mode)
        if inner[0] in GIT_DATA_DIRS:
            if inner[0] == "objects" and len(inner) > 1 and inner[1] == "info":
                return "objects/info (alternates) makes git read another object store"
            return None
        if inner[0] in GIT_DATA_FILES and len(inner) == 1:
            return None
        return (f".git/{inner[0]} is git configuration, not repository data (it can make the "
                "host's git run programs or read another repository)")
    return None


def _safe_parent(real_root: str, rel: str) -> str:
    """The real path for rel, refusing when any existing parent is not a directory
    of the project (a symlink planted in the real project meanwhile)."""
    path = os.path.join(real_root, rel)
    parent = os.path.dirname(path)
    rp = os.path.realpath(parent)
    if rp != parent or not (rp == real_root or rp.startswith(real_root + "/")):
        raise OSError(f"{rel}: a parent directory is a symlink or outside the project")
    return path


def apply(real: str, copy: str, ch: Changes, start: dict[str, Entry] | None = None) -> list[str]:
    """Make the real project match the copy for the listed changes. Symlinks are
    copied as symlinks, never followed. With `start` (the real project's snapshot at the
    start), a path the user changed in the real project during the session is a
    conflict: left as the user made it. Returns
    the paths that could not be applied, with why."""
    import shutil  # paranoid sessions only (shutil costs ~2 ms of every start-up)

    failed: list[str] = []
    for rel in [*ch.deleted, *ch.added, *ch.changed]:
        why = git_refusal(rel, copy)
        if why:
            failed.append(f"{rel}: refused: {why}")
        elif start is not None and _lentry(os.path.join(real, rel)) != start.get(rel) and not (
                rel in ch.added and stat.S_ISDIR(os.lstat(os.path.join(copy, rel)).st_mode)
                and os.path.isdir(os.path.join(real, rel))
                and not os.path.islink(os.path.join(real, rel))):
            failed.append(f"{rel}: refused: changed in the real project during the session "
                          "(kept as it is there)")
    refused = {f.split(": refused: ")[0] for f in failed}
    ch = Changes([r for r in ch.added if r not in refused], [r for r in ch.changed if r not in refused],
                 [r for r in ch.deleted if r not in refused])
    for rel in sorted(ch.deleted, key=lambda r: -r.count("/")):
        try:
            path = _safe_parent(real, rel)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            failed.append(f"{rel}: {exc}")
    for rel in sorted(ch.added + ch.changed, key=lambda r: r.count("/")):
        src = os.path.join(copy, rel)
        try:
            path = _safe_parent(real, rel)
            st = os.lstat(src)
            if stat.S_ISDIR(st.st_mode):
                if os.path.lexists(path) and not os.path.isdir(path):
                    os.unlink(path)
                os.makedirs(path, exist_ok=True)
                os.chmod(path, stat.S_IMODE(st.st_mode))
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            tmp = os.path.join(os.path.dirname(path), f".agentpen-apply-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), tmp)
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(src, tmp, follow_symlinks=False)
                os.chmod(tmp, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            else:
                failed.append(f"{rel}: not a file, directory or symlink (skipped)")
                continue
            os.replace(tmp, path)
        except OSError as exc:
            failed.append(f"{rel}: {exc}")
    return failed


def remove_session_dir(sdir: str) -> None:
    def onerror(func, path, exc_info):  # read-only dirs the agent left: make them writable
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)

    import shutil

    shutil.rmtree(sdir, onerror=onerror)


# -- wall clock and audit of caps ---------------------------------------------------------


class WallClock:
    """--wall-time: SIGTERM to ourselves when it runs out (the session's signalfd
    forwards it to the command, as for a user's kill), SIGKILL to bwrap WALL_GRACE
    seconds later if the command is still there (--die-with-parent takes the sandbox)."""

    def __init__(self, seconds: int, session: Any) -> None:
        import signal

        self.session = session
        self.hit: float | None = None
        self.killed = False
        self._old = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def _fire(self, signo: int, frame: Any) -> None:
        import signal
        import time

        if self.hit is None:
            self.hit = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            signal.setitimer(signal.ITIMER_REAL, WALL_GRACE)
        elif self.session.jail_pid and not self.killed:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.session.jail_pid, signal.SIGKILL)

    def cancel(self) -> None:
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


def audit_limits(stream: Any, log: Any, limits: Limits, session: Any, timer: WallClock | None,
                 cgroup: Any = None) -> None:
    import signal

    from agentpen.core.events import make_event

    hits: list[tuple[str, str]] = []
    if timer is not None and timer.hit is not None:
        how = "SIGTERM, then SIGKILL" if timer.killed else "SIGTERM"
        hits.append(("wall_time", f"wall-clock limit of {limits.wall_time}s reached: {how}"))
    o = session.outcome
    if limits.cpu_time and (o.signal == signal.SIGXCPU or o.exit_code == 128 + signal.SIGXCPU):
        hits.append(("cpu_time", f"CPU-time limit of {limits.cpu_time}s reached (SIGXCPU)"))
    if cgroup is not None:
        ev = cgroup.events()
        if ev["oom_kill"]:
            hits.append(("memory", f"memory cap of the session cgroup reached: {ev['oom_kill']} "
                                   "process(es) killed by the OOM killer"))
        if ev["pids_max"]:
            hits.append(("max_procs", f"process cap of the session cgroup reached "
                                      f"{ev['pids_max']} time(s): fork refused"))
    for name, msg in hits:
        log.warning(msg)
        stream.emit(make_event(
            "limit-hit", msg, level="warning", category=["process"], type=["end"],
            outcome="success", reason=name,
            agentpen={"limit": name, "limits": limits.describe()},
        ), sender="supervisor", pid=os.getpid(), durable=True)


# -- the end: apply or discard ----------------------------------------------------------------


def protected_rels(policy: SessionPolicy) -> list[str]:
    from agentpen.workers.jail.protect import plan_protection, protected_list

    covers = plan_protection(policy.project, protected_list(policy.protect, policy.unprotect))
    # pins are writable self-binds (e.g. .git itself, so commits work): not excluded
    return sorted({os.path.relpath(c.path, policy.project) for c in covers if c.kind != "pin"})


def decide(opts: Any, tty: bool) -> str:
    """apply | discard | ask | keep: --apply / --discard win; a terminal asks; without
    either, nothing is applied and the copy is kept for inspection."""
    if opts.apply:
        return "apply"
    if opts.discard:
        return "discard"
    return "ask" if tty else "keep"


def finish(policy: SessionPolicy, sdir: str, opts: Any, stream: Any, log: Any,
           start: Start | None = None) -> None:
    import sys

    from agentpen.core.events import make_event

    copy = policy.project_source
    ch = diff(policy.project, copy, protected_rels(policy), start=start.copy if start else None)
    failed: list[str] = []
    if not ch:
        decision = "none"
        print("paranoid: the session changed nothing in the project", file=sys.stderr)
    else:
        print(f"paranoid: changes the session made to {policy.project}:", file=sys.stderr)
        print(ch.stat(), file=sys.stderr)
        decision = decide(opts, sys.stdin.isatty() and sys.stderr.isatty())
        if decision == "ask":
            sys.stderr.write("apply these changes to the real project? [y/N] ")
            sys.stderr.flush()
            answer = sys.stdin.readline().strip().lower()
            decision = "apply" if answer in ("y", "yes") else "discard"
        if decision == "apply":
            failed = apply(policy.project, copy, ch, start=start.real if start else None)
            if failed:
                print("paranoid: could not apply:\n  " + "\n  ".join(failed), file=sys.stderr)
            else:
                print("paranoid: applied", file=sys.stderr)
        elif decision == "discard":
            print("paranoid: discarded", file=sys.stderr)
        else:
            print(f"paranoid: not applied (no terminal to ask, and neither --apply nor --discard); "
                  f"the session's copy is kept in {copy} (diff -r it against the project, "
                  f"delete it with rm -rf {sdir})", file=sys.stderr)
    stream.emit(make_event(
        "project-changes", f"paranoid: {len(ch.added)} added, {len(ch.changed)} changed, "
        f"{len(ch.deleted)} deleted: {decision}",
        level="warning" if failed else "info", category=["file"], type=["change"],
        outcome="failure" if failed else "success", reason=decision,
        agentpen={"project": policy.project, "decision": decision, "added": ch.added[:200],
                  "changed": ch.changed[:200], "deleted": ch.deleted[:200], "failed": failed[:200],
                  "kept": sdir if decision == "keep" else None},
    ), sender="supervisor", pid=os.getpid(), durable=True)
    if decision != "keep" and not failed:
        remove_session_dir(sdir)
