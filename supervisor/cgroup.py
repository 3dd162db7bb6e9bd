"""A cgroup v2 for the session when the user's cgroup tree is delegated: a total
memory cap (memory.max) and process cap (pids.max) over everything the session
starts, with memory.events / pids.events read back for the audit.

cgroup v2's rules shape this: a process may move only between cgroups whose common
ancestor's cgroup.procs it can write, and controllers can be enabled for children of a
cgroup that holds no process itself. So the session cgroup is a *sibling* of the
cgroup agentpen starts in (e.g. under systemd's user@UID.service/app.slice, which the
user owns), and the supervisor moves itself into it before any worker starts (they
inherit it), and back out at the end. Anything short of that (cgroup v1, a root-owned
login session-N.scope, a parent that holds processes) is "not delegated": the caller
falls back to per-process rlimits and says why.
"""

from __future__ import annotations

import contextlib
import os

from agentpen.core.record import record

ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "pids")


class NotDelegated(Exception):
    """No usable cgroup v2 subtree for this user: the reason, for the log and audit."""


def own_cgroup(proc_text: str) -> str:
    for line in proc_text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    raise NotDelegated("no cgroup v2 (unified) hierarchy for this process (cgroup v1 host)")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def delegated_parent(*, root: str = ROOT, proc_cgroup: str = "/proc/self/cgroup",
                     uid: int | None = None) -> tuple[str, str]:
    """(our cgroup dir, its parent) when the parent is ours to create a capped sibling
    in; else NotDelegated with the reason. Creates nothing (also used by --check)."""
    uid = os.getuid() if uid is None else uid
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        raise NotDelegated(f"{root} is not a cgroup v2 mount")
    rel = own_cgroup(_read(proc_cgroup))
    origin = os.path.normpath(os.path.join(root, rel.lstrip("/")))
    parent = os.path.dirname(origin)
    if rel in ("", "/") or not parent.startswith(root):
        raise NotDelegated("agentpen runs in the root cgroup")
    for p in (parent, *(os.path.join(parent, f) for f in ("cgroup.procs", "cgroup.subtree_control"))):
        try:
            st = os.stat(p)
        except OSError as exc:
            raise NotDelegated(f"{p}: {exc.strerror}") from None
        if st.st_uid != uid:
            raise NotDelegated(f"{p} is not owned by uid {uid} (not delegated; e.g. a login "
                               "session scope: run from a systemd --user service or "
                               "systemd-run --user --scope)")
    available = _read(os.path.join(parent, "cgroup.controllers")).split()
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        raise NotDelegated(f"{parent} lacks the {', '.join(missing)} controller(s)")
    return origin, parent


@record
class SessionCgroup:
    path: str  # the session's cgroup directory
    origin: str  # where the supervisor came from (its cgroup.procs)
    memory: int | None
    pids: int | None

    @classmethod
    def create(cls, session_id: str, *, memory: int | None, pids: int | None,
               root: str = ROOT, proc_cgroup: str = "/proc/self/cgroup",
               uid: int | None = None, pid: int | None = None) -> SessionCgroup:
        pid = os.getpid() if pid is None else pid
        origin, parent = delegated_parent(root=root, proc_cgroup=proc_cgroup, uid=uid)
        enabled = _read(os.path.join(parent, "cgroup.subtree_control")).split()
        want = " ".join(f"+{c}" for c in CONTROLLERS if c not in enabled)
        if want:
            try:
                _write(os.path.join(parent, "cgroup.subtree_control"), want)
            except OSError as exc:
                raise NotDelegated(f"cannot enable {want} in {parent}: {exc.strerror}") from None
        path = os.path.join(parent, f"agentpen-{session_id}")
        try:
            os.mkdir(path)
        except OSError as exc:
            raise NotDelegated(f"cannot create {path}: {exc.strerror}") from None
        cg = cls(path, origin, memory, pids)
        try:
            if memory:
                _write(os.path.join(path, "memory.max"), str(memory))
                with contextlib.suppress(FileNotFoundError):  # no swap accounting: fine
                    _write(os.path.join(path, "memory.swap.max"), "0")
            if pids:
                _write(os.path.join(path, "pids.max"), str(pids))
            _write(os.path.join(path, "cgroup.procs"), str(pid))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise NotDelegated(f"cannot set up {path}: {exc.strerror}") from None
        return cg

    def events(self) -> dict[str, int]:
        """{"oom_kill": n, "pids_max": n}: how often a cap was hit."""
        out = {"oom_kill": 0, "pids_max": 0}
        with contextlib.suppress(OSError):
            for line in _read(os.path.join(self.path, "memory.events")).splitlines():
                k, _, v = line.partition(" ")
                if k == "oom_kill":
                    out["oom_kill"] = int(v)
        with contextlib.suppress(OSError):
            for line in _read(os.path.join(self.path, "pids.events")).splitlines():
                k, _, v = line.partition(" ")
                if k == "max":
                    out["pids_max"] = int(v)
        return out

    def close(self, pid: int | None = None) -> bool:
        """Move back to where we came from and remove the session cgroup (True when
        removed; a straggler keeps it, and the next session's is a new name)."""
        with contextlib.suppress(OSError):
            _write(os.path.join(self.origin, "cgroup.procs"), str(os.getpid() if pid is None else pid))
        try:
            os.rmdir(self.path)
        except OSError:
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.memory:
            parts.append(f"memory.max={self.memory // (1024 * 1024)}M")
        if self.pids:
            parts.append(f"pids.max={self.pids}")
        return f"cgroup v2 {self.path} ({', '.join(parts)}, whole session)"
