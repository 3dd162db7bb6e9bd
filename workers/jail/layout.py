"""The host's filesystem layout, detected once at launch (the only impure part of
building the bwrap argv): which system directories exist as directories or as
symlinks (merged /usr or not, NixOS), and what the user can read in /etc."""

from __future__ import annotations

import os

from agentpen.core.record import field, record
from agentpen.core.which import which

# Top-level system paths made visible read-only when present. Anything else at the
# root (/home, /root, /srv, /mnt, /media, /var, /opt, /boot...) stays invisible.
SYSTEM_PATHS: tuple[str, ...] = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/nix/store",  # NixOS: every program and library lives here
)
# NixOS keeps the active system behind these symlinks (bwrap's /run is a fresh tmpfs).
RUN_SYMLINKS: tuple[str, ...] = ("/run/current-system", "/run/opengl-driver", "/run/booted-system")
# /etc entries that the netns design replaces with staged data (see bwrap.py).
ETC_STAGED = frozenset({"hosts", "resolv.conf", "nsswitch.conf"})


@record(frozen=True)
class EtcEntry:
    name: str
    symlink: str | None = None  # target when the host entry is a symlink; else ro-bound


@record(frozen=True)
class HostLayout:
    kind: str  # "fhs-merged-usr", "fhs", "nixos": for messages and `config show`
    ro_dirs: tuple[str, ...]  # bound read-only at the same path
    symlinks: tuple[tuple[str, str], ...]  # (target, link): recreated with --symlink
    etc: tuple[EtcEntry, ...] = ()
    nsswitch: str = ""  # host nsswitch.conf text ("" when absent)
    env_binary: str = "/usr/bin/env"  # GNU env, for --default-signal inside
    bwrap: str = "/usr/bin/bwrap"
    run_symlinks: tuple[tuple[str, str], ...] = field(default_factory=tuple)


class LayoutError(RuntimeError):
    """The host lacks something the jail cannot do without."""


def detect_layout(etc_dir: str = "/etc") -> HostLayout:
    ro_dirs: list[str] = []
    symlinks: list[tuple[str, str]] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            symlinks.append((os.readlink(path), path))
        elif os.path.isdir(path):
            ro_dirs.append(path)
    if "/usr" not in ro_dirs and "/nix/store" not in ro_dirs:
        raise LayoutError("host layout: neither /usr nor /nix/store is a directory")
    run_links = tuple(
        (os.readlink(p), p) for p in RUN_SYMLINKS if os.path.islink(p)
    )
    if "/nix/store" in ro_dirs:
        kind = "nixos"
    elif any(link == "/bin" for _, link in symlinks):
        kind = "fhs-merged-usr"
    else:
        kind = "fhs"
    etc: list[EtcEntry] = []
    for entry in sorted(os.scandir(etc_dir), key=lambda e: e.name):
        if entry.name in ETC_STAGED:
            continue
        if entry.is_symlink():
            etc.append(EtcEntry(entry.name, os.readlink(entry.path)))
        elif entry.is_dir(follow_symlinks=False):
            if os.access(entry.path, os.R_OK | os.X_OK):
                etc.append(EtcEntry(entry.name))
        elif os.access(entry.path, os.R_OK):  # /etc/shadow and friends stay out
            etc.append(EtcEntry(entry.name))
    try:
        with open(os.path.join(etc_dir, "nsswitch.conf")) as f:
            nsswitch = f.read()
    except OSError:
        nsswitch = ""
    env_binary = _find_gnu_env()
    bwrap = which("bwrap")
    if bwrap is None:
        raise LayoutError("bwrap not found on PATH: install bubblewrap (apt install bubblewrap)")
    return HostLayout(
        kind=kind, ro_dirs=tuple(ro_dirs), symlinks=tuple(symlinks), etc=tuple(etc),
        nsswitch=nsswitch, env_binary=env_binary, bwrap=os.path.realpath(bwrap),
        run_symlinks=run_links,
    )


def _find_gnu_env() -> str:
    for cand in ("/usr/bin/env", "/bin/env", "/run/current-system/sw/bin/env"):
        if os.access(cand, os.X_OK):
            return cand
    raise LayoutError(
        "GNU env not found (/usr/bin/env): the jail needs `env --default-signal` "
        "(coreutils >= 8.31) to restore the command's signal dispositions"
    )
