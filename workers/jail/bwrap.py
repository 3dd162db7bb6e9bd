"""Pure policy -> bwrap argv. No I/O: the host layout and the protection plan are
inputs (detected by layout.py and protect.py), descriptors are numbers.

Mount order matters (later mounts sit on top): system dirs, /proc /dev /tmp /run,
staged /etc, $HOME tmpfs, extra mounts (agent config, command install), the
project (rw), then the persistence covers inside the project.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from agentpen.core.policy import Mount, SessionPolicy
from agentpen.core.record import record
from agentpen.workers.jail.layout import HostLayout
from agentpen.workers.jail.protect import Cover

HOSTNAME = "agentpen"
# Signals the command gets back at their default disposition (bwrap runs with the
# terminal ones ignored, Python leaves PIPE and XFSZ ignored).
DEFAULT_SIGNALS = "INT,QUIT,TSTP,TTIN,TTOU,PIPE,XFSZ"


@record(frozen=True)
class JailFds:
    seccomp: int  # BPF program (memfd), for --seccomp
    json_status: int  # write end: bwrap reports child-pid and exit-code here
    hosts: int  # staged /etc/hosts (memfd)
    resolv: int  # staged /etc/resolv.conf (memfd)
    nsswitch: int  # staged /etc/nsswitch.conf (memfd)
    empty: tuple[int, ...] = ()  # one memfd per protected-file placeholder (cover order)
    block: int | None = None  # --block-fd: the sandbox waits for data/EOF here


def hosts_file() -> str:
    return (
        f"127.0.0.1\tlocalhost {HOSTNAME}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )


def resolv_conf(port: int = 53) -> str:
    if port != 53:
        # resolv.conf cannot name a port: the netns worker must serve on 53.
        raise ValueError(f"resolv.conf cannot point at DNS port {port}; the resolver needs 53")
    return "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


def nsswitch_conf(host_text: str) -> str:
    """The host's nsswitch.conf with its hosts: line forced to `files dns`
    (no mdns/myhostname/resolve modules that would talk to host daemons)."""
    lines = []
    seen = False
    for line in host_text.splitlines():
        if line.split(":", 1)[0].strip() == "hosts" and ":" in line:
            if not seen:
                lines.append("hosts: files dns")
            seen = True
            continue
        lines.append(line)
    if not seen:
        lines.append("hosts: files dns")
    return "\n".join(lines) + "\n"


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_session_source(src: str, what: str, policy: SessionPolicy) -> None:
    """A bind source other than the target itself: only a paranoid session's private
    copy, inside <runtime path>/sessions/<id>/ (never the runtime path at large)."""
    if not os.path.isabs(src) or os.path.normpath(src) != src:
        raise ValueError(f"{what} source {src!r}: must be an absolute, normalised path")
    sid = policy.session_id
    if not any(_is_within(src, os.path.join(rt, "sessions", sid)) and
               src != os.path.join(rt, "sessions", sid) for rt in policy.runtime_paths):
        raise ValueError(f"{what} source {src!r}: only this session's own directory "
                         "(<state>/sessions/<session-id>/) may be bound elsewhere")


def check_mount(m: Mount, policy: SessionPolicy) -> None:
    """Refuse, with the reason, a mount that would expose what the jail hides."""
    p = m.path
    if m.source:
        _check_session_source(m.source, f"mount {p!r}", policy)
    if not os.path.isabs(p) or os.path.normpath(p) != p:
        raise ValueError(f"mount {p!r}: must be an absolute, normalised path")
    if m.mode not in ("ro", "rw"):
        raise ValueError(f"mount {p!r}: mode must be ro or rw, not {m.mode!r}")
    if p == "/":
        raise ValueError("mount '/': would expose the whole host filesystem")
    if policy.home and _is_within(policy.home, p):
        raise ValueError(f"mount {p!r}: would expose the home directory {policy.home} itself")
    for rt in policy.runtime_paths:
        if _is_within(p, rt) or _is_within(rt, p):
            raise ValueError(f"mount {p!r}: would expose agentpen's runtime path {rt}")
    for special in ("/proc", "/dev", "/sys"):
        if _is_within(p, special):
            raise ValueError(f"mount {p!r}: kernel filesystems are not mountable into the jail")


def check_project(policy: SessionPolicy) -> None:
    p = policy.project
    if not os.path.isabs(p) or os.path.normpath(p) != p:
        raise ValueError(f"project {p!r}: must be an absolute, normalised path")
    if p == "/" or (policy.home and _is_within(policy.home, p)):
        raise ValueError(
            f"project {p!r}: refusing to make / or the home directory writable; "
            "run agentpen from the repository's own directory"
        )
    for rt in policy.runtime_paths:
        if _is_within(p, rt) or _is_within(rt, p):
            raise ValueError(f"project {p!r}: overlaps agentpen's runtime path {rt}")
    if policy.project_source:
        _check_session_source(policy.project_source, "project", policy)


def build_bwrap_argv(
    policy: SessionPolicy,
    layout: HostLayout,
    fds: JailFds,
    covers: Sequence[Cover] = (),
) -> list[str]:
    """The full argv: [bwrap, options..., --, env --default-signal=... --, command...]."""
    if not policy.command or not os.path.isabs(policy.command[0]):
        raise ValueError("policy.command[0] must be the resolved absolute path")
    if not policy.home or not os.path.isabs(policy.home):
        raise ValueError("policy.home must be an absolute path")
    check_project(policy)
    for m in policy.mounts:
        check_mount(m, policy)

    a: list[str] = [layout.bwrap]
    a += [
        "--unshare-user", "--uid", str(policy.uid), "--gid", str(policy.gid),
        "--disable-userns",  # no nested user namespace: closes the userns attack surface
        "--unshare-pid",  # the host's processes are invisible and unsignalable
        "--unshare-ipc",  # no SysV IPC / POSIX mqueue with the host
        "--unshare-uts", "--hostname", HOSTNAME,  # the host's name is not the jail's business
        "--unshare-cgroup",  # cgroup paths do not reveal the host's
        "--die-with-parent",  # the sandbox ends with the jail worker
        "--cap-drop", "ALL",  # no capability, even in the jail's own user namespace
    ]
    # System directories, read-only at the same paths (layout detected on the host).
    for d in layout.ro_dirs:
        a += ["--ro-bind", d, d]
    for target, link in layout.symlinks:
        a += ["--symlink", target, link]
    a += ["--proc", "/proc"]  # fresh procfs of the jail's pid namespace
    a += ["--dev", "/dev"]  # null, zero, full, random, urandom, tty, pts, shm only
    # Private, empty: host temp files and daemon sockets (dbus, ssh-agent, docker in /run,
    # /tmp) stay out; /var/tmp is scratch some tools expect (the rest of /var stays out).
    for d in ("/tmp", "/run", "/var/tmp"):  # noqa: S108 - fresh tmpfs in the jail, not host files
        a += ["--tmpfs", d]
    for target, link in layout.run_symlinks:
        a += ["--symlink", target, link]
    # Staged /etc: what the user can read, with the resolver files replaced.
    a += ["--tmpfs", "/etc"]
    for e in layout.etc:
        path = f"/etc/{e.name}"
        if e.symlink is not None:
            a += ["--symlink", e.symlink, path]
        else:
            a += ["--ro-bind-try", path, path]  # -try: an entry may vanish since detection
    a += ["--ro-bind-data", str(fds.hosts), "/etc/hosts"]  # localhost only
    a += ["--ro-bind-data", str(fds.resolv), "/etc/resolv.conf"]  # the netns DNS
    a += ["--ro-bind-data", str(fds.nsswitch), "/etc/nsswitch.conf"]  # hosts: files dns
    a += ["--remount-ro", "/etc"]
    # $HOME is empty: secrets, sibling repos and dotfiles of the real home stay out.
    a += ["--tmpfs", policy.home]
    for m in policy.mounts:
        a += ["--bind" if m.mode == "rw" else "--ro-bind", m.source or m.path, m.path]
    # The one writable place (paranoid: a throwaway copy bound at the project's path).
    src_root = policy.project_source or policy.project

    def src(path: str) -> str:  # a project path's bind source
        return src_root + path[len(policy.project):]

    a += ["--bind", src_root, policy.project]
    empty = iter(fds.empty)
    for c in covers:
        if not _is_within(c.path, policy.project) or c.path == policy.project:
            raise ValueError(f"protection cover {c.path} is not inside the project")
        if c.kind == "pin":
            a += ["--bind", src(c.path), c.path]  # a mount point cannot be renamed away
        elif c.kind == "ro-bind":
            a += ["--ro-bind", src(c.path), c.path]
        elif c.kind == "dir":
            a += ["--perms", "0555", "--tmpfs", c.path, "--remount-ro", c.path]
        elif c.kind == "scratch":  # writable, but outside the project: reported, discarded
            if not c.source or _is_within(c.source, policy.project):
                raise ValueError(f"scratch cover {c.path} needs a source outside the project")
            a += ["--bind", c.source, c.path]
        else:
            try:
                fd = next(empty)
            except StopIteration:
                raise ValueError("one empty data fd is needed per file placeholder") from None
            a += ["--ro-bind-data", str(fd), c.path]
    a += ["--chdir", policy.project]
    a += ["--seccomp", str(fds.seccomp)]
    a += ["--json-status-fd", str(fds.json_status)]
    if fds.block is not None:
        a += ["--block-fd", str(fds.block)]
    a += ["--", layout.env_binary, f"--default-signal={DEFAULT_SIGNALS}", "--", *policy.command]
    return a
