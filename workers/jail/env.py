"""The jail's environment: built from nothing, never the host's minus a list.

Only terminal/locale basics, a sane PATH, the identity variables, the agent's own
passthrough names (API keys, base URLs) and the user's --env names. Agent sockets
and session buses are never passed, even when asked for by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

BASE_NAMES = frozenset({"TERM", "COLORTERM", "LANG", "LANGUAGE", "TZ", "NO_COLOR"})
# Handles to host services: any one of them is a way out of the sandbox.
NEVER = frozenset({
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "GPG_AGENT_INFO", "GNUPGHOME",
    "DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS", "XDG_RUNTIME_DIR",
    "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "KRB5CCNAME", "DOCKER_HOST",
    "SWAYSOCK", "I3SOCK", "TMUX", "STY", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT",
})
SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin")


class EnvError(ValueError):
    """A requested variable may not enter the jail."""


def sane_path(home: str, path_dirs: Iterable[str], *, local_bin_exists: bool) -> str:
    dirs: list[str] = []
    if local_bin_exists:
        dirs.append(os.path.join(home, ".local", "bin"))
    dirs += list(path_dirs)
    dirs += SYSTEM_PATH
    return ":".join(dict.fromkeys(dirs))  # dedupe, first occurrence wins


def scrub_env(
    host_env: Mapping[str, str],
    *,
    home: str,
    user: str,
    shell: str,
    path_dirs: Iterable[str],
    passthrough: Iterable[str] = (),
    extra: Iterable[str] = (),
    local_bin_exists: bool = False,
) -> dict[str, str]:
    """The complete environment for bwrap and the command. Pure.

    `passthrough` (the agent's registry list) silently skips the never-list; an
    `extra` (--env NAME) that names a host socket is an error: the user asked for
    something agentpen will not do, and must hear it."""
    for name in extra:
        if name in NEVER:
            raise EnvError(f"--env {name}: refused, it hands a host service to the sandbox")
    env: dict[str, str] = {}
    for name, value in host_env.items():
        if name in BASE_NAMES or name.startswith("LC_"):
            env[name] = value
    env.setdefault("TERM", "xterm-256color")
    for name in (*passthrough, *extra):
        if name in NEVER:
            continue
        if name in host_env:
            env[name] = host_env[name]
    env["HOME"] = home
    env["USER"] = user
    env["LOGNAME"] = user
    env["SHELL"] = shell if shell.startswith("/") else "/bin/sh"
    env["PATH"] = sane_path(home, path_dirs, local_bin_exists=local_bin_exists)
    return env


def check_env(env: Mapping[str, str]) -> None:
    """Fail closed if an environment handed to the jail carries a never-name."""
    bad = sorted(set(env) & NEVER)
    if bad:
        raise EnvError(f"jail environment carries host handles {bad}: refusing to start")
