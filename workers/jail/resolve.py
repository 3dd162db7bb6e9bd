"""Command resolution the way the user expects: PATH lookup, symlinks followed,
the script's interpreter found too, and for anything under $HOME the narrowest
read-only mounts that make it run (never ~/.local or $HOME itself).

Pure over the filesystem (reads only); the caller turns the result into policy.
"""

from __future__ import annotations

import os

from agentpen.core.policy import Mount
from agentpen.core.record import field, record

MAX_SHEBANG = 256
MAX_DEPTH = 4  # interpreter of an interpreter (#!/usr/bin/env node -> node): bounded


class CommandNotFound(LookupError):
    exit_code = 127


class CommandNotExecutable(PermissionError):
    exit_code = 126


@record
class ResolvedCommand:
    path: str  # absolute real path of what runs
    mounts: list[Mount] = field(default_factory=list)  # ro mounts needed under $HOME
    path_dirs: list[str] = field(default_factory=list)  # PATH entries the command needs
    interpreter: str | None = None  # real path of the script's interpreter, if any


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _which(name: str, user_path: str) -> str | None:
    for d in user_path.split(":"):
        if not d or not os.path.isabs(d):
            continue  # relative PATH entries would resolve against the project: skip
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _install_root(real: str, home: str) -> str:
    """The narrowest directory that holds a program installed under $HOME:
    its npm package (package.json), its venv (pyvenv.cfg), an nvm/asdf-style
    version dir (bin/ + lib/), or else the file alone."""
    d = os.path.dirname(real)
    while _within(d, home) and d != home:
        if os.path.isfile(os.path.join(d, "pyvenv.cfg")):
            return d
        if os.path.isfile(os.path.join(d, "package.json")):
            return d  # the npm package: its own node_modules travels with it
        parent = os.path.dirname(d)
        base = os.path.basename(d)
        if base == "bin" and os.path.isdir(os.path.join(parent, "lib")) and _versioned(parent):
            return parent  # ~/.nvm/versions/node/v20.1.0: node and its bundled npm
        d = parent
    return real


def _versioned(d: str) -> bool:
    name = os.path.basename(d)
    return (name[:1] == "v" and name[1:2].isdigit()) or name[:1].isdigit()


_BROAD = (".local", ".local/share", ".local/bin", ".config", ".cache", ".npm", ".nvm",
          ".nvm/versions", ".nvm/versions/node", "node_modules", ".local/lib")


# What the jail shows of the host anyway (read-only): programs here need no mount.
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/nix/store",
           "/run/current-system")


def _outside_root(real: str) -> str:
    """A program outside $HOME and the system directories (/opt/X, a Homebrew keg, ...):
    its venv or npm package, else the prefix of its bin/ directory, else the file."""
    d = os.path.dirname(real)
    while d not in ("/", ""):
        if os.path.isfile(os.path.join(d, "pyvenv.cfg")) or os.path.isfile(os.path.join(d, "package.json")):
            return d
        if os.path.basename(d) == "bin":
            prefix = os.path.dirname(d)
            return prefix if prefix.count("/") >= 2 else real  # /opt/X, never /opt or /
        d = os.path.dirname(d)
    return real


def _mount_for(real: str, home: str, why: str) -> Mount | None:
    if not _within(real, home):
        if any(_within(real, root) for root in _SYSTEM):
            return None  # system paths are already visible read-only
        return Mount(_outside_root(real), "ro", why)
    root = _install_root(real, home)
    rel = os.path.relpath(root, home)
    if root == home or rel in _BROAD:
        root = real  # never a broad directory: the file alone
    return Mount(root, "ro", why)


def _shebang(path: str) -> list[str] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_SHEBANG)
    except OSError as exc:
        raise CommandNotExecutable(f"{path}: cannot read: {exc.strerror}") from None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode(errors="replace").strip()
    return line.split() or None


def resolve_command(argv0: str, user_path: str, home: str) -> ResolvedCommand:
    if "/" in argv0:
        found = argv0 if os.path.isabs(argv0) else os.path.abspath(argv0)
        if not os.path.lexists(found):
            raise CommandNotFound(f"{argv0}: no such file")
    else:
        found_opt = _which(argv0, user_path)
        if found_opt is None:
            raise CommandNotFound(f"{argv0}: command not found on PATH")
        found = found_opt
    real = os.path.realpath(found)
    if not os.path.isfile(real):
        raise CommandNotFound(f"{argv0}: {real} is not a file")
    if not os.access(real, os.X_OK):
        raise CommandNotExecutable(f"{argv0}: {real} is not executable")
    res = ResolvedCommand(path=real)
    _add(res, real, home, f"command {argv0}")
    cur = real
    for _ in range(MAX_DEPTH):
        sb = _shebang(cur)
        if sb is None:
            break
        interp = sb[0]
        if os.path.basename(interp) == "env" and len(sb) > 1:
            args = [x for x in sb[1:] if not x.startswith("-")]  # env -S node: skip options
            if not args:
                break
            name = args[0]
            found_i = name if "/" in name else _which(name, user_path)
            if found_i is None:
                raise CommandNotFound(f"{argv0}: interpreter {name!r} not found on PATH")
            res.path_dirs.append(os.path.dirname(found_i))
            interp = found_i
        interp_real = os.path.realpath(interp)
        if not os.path.isfile(interp_real) or not os.access(interp_real, os.X_OK):
            raise CommandNotExecutable(f"{argv0}: interpreter {interp} is not executable")
        res.interpreter = interp_real
        _add(res, interp_real, home, f"interpreter of {argv0}")
        if interp_real == cur:
            break
        cur = interp_real
    return res


def _add(res: ResolvedCommand, real: str, home: str, why: str) -> None:
    m = _mount_for(real, home, why)
    if m is not None and all(not _within(m.path, x.path) for x in res.mounts):
        res.mounts = [x for x in res.mounts if not _within(x.path, m.path)] + [m]
    d = os.path.dirname(real)
    if d not in res.path_dirs:
        res.path_dirs.append(d)
