"""Persistence defence: project paths that run code later, outside the sandbox,
stay read-only inside it (docs/jail.md lists them with their reasons).

Mechanism (bwrap, after the project's rw bind):
- an existing protected path is ro-bound onto itself;
- a missing one is covered at its first missing component by a read-only
  placeholder (an empty read-only tmpfs for a directory, an empty --ro-bind-data
  file for a file), so nothing can be created there;
- every directory between the project root and a cover is bound onto itself (rw)
  so it becomes a mount point: rename/unlink of a mount point fails with EBUSY,
  which stops `mv .git .git.old && mv .git.new .git` from swapping the covers away.

A missing agent-config directory (`SCRATCH_WHEN_MISSING`) is covered instead by a private
scratch directory the supervisor made outside the project: the agent writes its own state
there (opencode's `.opencode/.gitignore`) and keeps running, nothing reaches the project,
and the supervisor reports what was written, then deletes it (`scratch_contents`).

bwrap creates a placeholder's mount point on the host (the project is a rw bind),
so the parent of the jail removes those, still empty, after the run
(`remove_placeholders`). Symlinks on a protected path are refused: a mount cannot
cover a symlink, and the link itself could be replaced.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from agentpen.core.record import record

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Literal

    CoverKind = Literal["ro-bind", "dir", "file", "pin", "scratch"]

# Project-relative path -> why it is protected. A trailing "/" means a directory.
DEFAULT_PROTECTED: dict[str, str] = {
    ".git/hooks/": "git runs hooks on commit/checkout/merge on the host",
    ".git/config": "core.fsmonitor, core.hooksPath, diff.external, filter.*, alias run programs",
    ".git/modules/": "submodule git dirs: their config and hooks run like .git's",
    ".gitmodules": "submodule URLs and update=!command run on `git submodule update`",
    ".envrc": "direnv executes it on cd",
    ".vscode/": "tasks.json, settings (terminal env, interpreter paths) run in the editor",
    ".idea/": "JetBrains run configurations and startup tasks",
    ".devcontainer/": "devcontainer.json postCreate/postStart commands run on the host",
    ".mcp.json": "project MCP servers: commands the next agent session launches",
    ".claude/": "Claude Code project settings: hooks and commands",
    ".codex/": "Codex project config",
    ".gemini/": "Gemini CLI project settings: MCP servers, tools",
    ".qwen/": "Qwen Code project settings: MCP servers, tools",
    ".opencode/": "opencode project config: plugins, commands",
    "opencode.json": "opencode project config: MCP servers, commands",
    ".aider.conf.yml": "aider config: lint-cmd/test-cmd run commands",
    ".cursor/": "Cursor project rules and MCP servers",
    ".husky/": "husky git hooks (run through core.hooksPath)",
    ".pre-commit-config.yaml": "pre-commit hooks run on the next host commit",
}

# Agents write their own per-project state into these (opencode creates .opencode/.gitignore
# at start and dies on EROFS). When missing, they get a writable scratch directory whose
# content is reported and discarded at exit, rather than a read-only placeholder. Editor,
# git and hook paths stay read-only: a write there failing loudly beats one lost quietly.
SCRATCH_WHEN_MISSING: frozenset[str] = frozenset(
    {".claude", ".codex", ".gemini", ".qwen", ".opencode", ".cursor"})



def placeholder_data(name: str) -> bytes:
    """What a missing protected file reads as inside: valid and inert, so an agent
    that parses it (opencode.json, .mcp.json) starts rather than failing on ''."""
    # JSON and YAML parsers both read "{}" as an empty mapping (aider rejects an empty
    # .aider.conf.yml and exits 2).
    return b"{}\n" if name.endswith((".json", ".yml", ".yaml")) else b""


class ProtectError(ValueError):
    """A protected path cannot be enforced (fail closed)."""


@record(frozen=True)
class Cover:
    path: str  # absolute
    kind: CoverKind  # ro-bind: existing path; dir/file: placeholder; pin: rw self-bind
    rel: str  # the protected entry it enforces
    data: bytes = b""  # content of a file placeholder
    source: str = ""  # scratch: the host directory bound writable at `path`

    @property
    def placeholder(self) -> bool:
        """bwrap creates its mount point in the project: removed after the run."""
        return self.kind in ("dir", "file", "scratch")


def protected_list(extra: Iterable[str] = (), lifted: Iterable[str] = ()) -> list[str]:
    lifted_set = {_norm_rel(p) for p in lifted}
    out: list[str] = []
    for rel in [*DEFAULT_PROTECTED, *extra]:
        n = _norm_rel(rel)
        if n not in lifted_set and n not in {_norm_rel(o) for o in out}:
            out.append(rel)
    return out


def _norm_rel(rel: str) -> str:
    return rel.rstrip("/")


def plan_protection(project: str, rels: Iterable[str], scratch_root: str | None = None) -> list[Cover]:
    """Read the project (lstat only) and decide how each protected path is covered.
    Returns covers in mount order: pins (outermost first), then covers. With
    `scratch_root`, a missing SCRATCH_WHEN_MISSING directory is a "scratch" cover whose
    source is a (not yet created) directory under it; without, a read-only one."""
    if not os.path.isabs(project):
        raise ProtectError(f"project must be absolute: {project!r}")
    covers: dict[str, Cover] = {}
    pins: dict[str, Cover] = {}
    for rel in rels:
        parts = [p for p in rel.split("/") if p]
        if not parts or rel.startswith("/") or any(p in (".", "..") for p in parts):
            raise ProtectError(f"protected path must be project-relative without '..': {rel!r}")
        want_dir = rel.endswith("/")
        cur = project
        for i, part in enumerate(parts):
            path = os.path.join(cur, part)
            last = i == len(parts) - 1
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if last and want_dir and scratch_root and _norm_rel(rel) in SCRATCH_WHEN_MISSING:
                    source = os.path.join(scratch_root, _norm_rel(rel).replace("/", "%"))
                    covers.setdefault(path, Cover(path, "scratch", rel, source=source))
                elif not last or want_dir:
                    covers.setdefault(path, Cover(path, "dir", rel))
                else:
                    covers.setdefault(path, Cover(path, "file", rel, placeholder_data(part)))
                break
            if stat.S_ISLNK(st.st_mode):
                raise ProtectError(
                    f"protected path {rel!r}: {path} is a symlink, which a read-only mount "
                    f"cannot cover; remove the link or lift the protection (--unprotect {rel})"
                )
            if last or not stat.S_ISDIR(st.st_mode):
                # A file where a directory was expected (.git as a gitfile) is covered
                # whole: replacing it would redirect git.
                covers.setdefault(path, Cover(path, "ro-bind", rel))
                break
            pins.setdefault(path, Cover(path, "pin", rel))
            cur = path
    # Drop covers inside another cover, and pins that are covered.
    def inside(p: str, q: str) -> bool:
        return p.startswith(q.rstrip("/") + "/")

    kept = [c for c in covers.values() if not any(inside(c.path, o) for o in covers)]
    kept_pins = [
        p for p in pins.values()
        if p.path not in covers and not any(inside(p.path, c.path) for c in kept)
    ]
    order = sorted(kept_pins, key=lambda c: c.path.count("/"))
    return order + sorted(kept, key=lambda c: c.path)


def placeholders(covers: Iterable[Cover]) -> list[str]:
    return [c.path for c in covers if c.placeholder]


def remove_placeholders(covers: Iterable[Cover]) -> list[str]:
    """After the jail has exited: remove the mount points bwrap created for
    placeholders, only while they are still empty (never anyone's content).
    Returns what is left behind (non-empty or not removable) for the audit."""
    left: list[str] = []
    for c in covers:
        if not c.placeholder:
            continue
        try:
            st = os.lstat(c.path)
        except FileNotFoundError:
            continue
        try:
            if c.kind in ("dir", "scratch") and stat.S_ISDIR(st.st_mode):
                os.rmdir(c.path)  # fails (ENOTEMPTY) on content: kept, reported
            elif c.kind == "file" and stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(c.path)  # bwrap's mount point: created empty, never written
            else:
                left.append(c.path)
        except FileNotFoundError:
            continue  # removed meanwhile (a second cleanup path): done
        except OSError:
            left.append(c.path)
    return left


def _temp_dir() -> str:
    """tempfile.gettempdir()'s choice ($TMPDIR, $TEMP, $TMP, then /tmp, /var/tmp,
    /usr/tmp: the first writable directory) without importing tempfile (random, shutil)
    or writing a probe file into each candidate, on every session's start (issue 10)."""
    candidates = [os.environ.get(v) for v in ("TMPDIR", "TEMP", "TMP")]
    # A directory name only: the supervisor creates it with mkdir(0o700), which fails on
    # anything already there (a random name, no link followed).
    for d in [*(c for c in candidates if c), "/tmp", "/var/tmp", "/usr/tmp"]:  # noqa: S108
        if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return os.path.abspath(d)
    return os.getcwd()


def scratch_root_for(project: str) -> str | None:
    """A fresh name for the scratch covers' directory in the user's temp dir (the
    supervisor creates it only when a cover needs it). None when that would fall
    inside the project: the covers are then read-only."""
    root = os.path.join(_temp_dir(), f"agentpen-scratch-{os.getpid()}-{os.urandom(6).hex()}")
    real = os.path.realpath(project)
    return None if root == real or root.startswith(real.rstrip("/") + "/") else root


def scratch_contents(covers: Iterable[Cover], limit: int = 10_000) -> tuple[list[tuple[str, int]], bool]:
    """After the jail has exited: what the command wrote into scratch covers, as
    (project path, size) for every non-directory, without following links. Returns
    (entries, truncated): a scratch tree holding more than `limit` entries is cut short."""
    out: list[tuple[str, int]] = []
    for c in covers:
        if c.kind != "scratch" or not c.source:
            continue
        for root, dirs, files in os.walk(c.source):
            dirs.sort()
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                full = os.path.join(root, name)
                try:
                    size = os.lstat(full).st_size
                except OSError:
                    continue
                out.append((os.path.join(c.path, os.path.relpath(full, c.source)), size))
                if len(out) >= limit:
                    return out, True
    return out, False
