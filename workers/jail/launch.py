"""The jail worker's last act: assemble descriptors and exec bwrap.

`exec_jail` runs in the already-forked jail worker (uid 0 in the netns user
namespace, no capabilities). `build_jail` is the pure plan behind it, for
`agentpen config show` and tests. The parent (netns worker) calls
`jail_covers(policy)` before forking and `remove_placeholders(covers)` after the
jail has exited, so the placeholders bwrap creates leave nothing in the project.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import signal
import struct
from collections.abc import Sequence

from agentpen.core.osutil import capability_sets, close_fds_except, last_cap, load_libc
from agentpen.core.policy import SessionPolicy
from agentpen.core.record import field, record
from agentpen.workers.jail import seccomp
from agentpen.workers.jail.bwrap import (
    JailFds,
    build_bwrap_argv,
    hosts_file,
    nsswitch_conf,
    resolv_conf,
)
from agentpen.workers.jail.env import check_env
from agentpen.workers.jail.layout import HostLayout, detect_layout
from agentpen.workers.jail.protect import (
    Cover,
    plan_protection,
    protected_list,
    remove_placeholders,
)

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = [
    "JailPlan", "build_jail", "exec_jail", "jail_covers", "open_data_fd", "remove_placeholders",
]

# Ignored by bwrap itself so a terminal Ctrl-C/Ctrl-Z does not kill or stop bwrap's
# monitor (and, through --die-with-parent, the sandbox); `env --default-signal`
# restores them for the command inside.
BWRAP_IGNORED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
CAP_SETFCAP = 31
_PR_GET_SECUREBITS = 27
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SECBIT_NOROOT = 1
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


@record
class JailPlan:
    argv: list[str]
    env: dict[str, str]
    covers: list[Cover] = field(default_factory=list)
    seccomp_rules: list[tuple[str, str, str]] = field(default_factory=list)


def jail_covers(policy: SessionPolicy, scratch_root: str | None = None) -> list[Cover]:
    """The persistence covers for this project (reads the project with lstat):
    the built-in list plus `policy.protect`, less `policy.unprotect`."""
    return plan_protection(policy.project, protected_list(policy.protect, policy.unprotect),
                           scratch_root)


def _nominal_fds(covers: Sequence[Cover]) -> JailFds:
    n_files = sum(1 for c in covers if c.kind == "file")
    return JailFds(seccomp=3, json_status=4, hosts=5, resolv=6, nsswitch=7,
                   empty=tuple(range(8, 8 + n_files)))


def build_jail(
    policy: SessionPolicy, layout: HostLayout, covers: Sequence[Cover] = (),
) -> JailPlan:
    """Pure: the plan with nominal descriptor numbers (the real ones are memfds)."""
    check_env(policy.env)
    argv = build_bwrap_argv(policy, layout, _nominal_fds(covers), covers)
    return JailPlan(argv, dict(policy.env), list(covers), seccomp.rule_table())


def open_data_fd(name: str, data: bytes) -> int:
    """A sealed memfd holding `data`: nothing on the host filesystem, gone when
    the last holder dies (a SIGKILLed session leaves nothing behind)."""
    fd = os.memfd_create(f"agentpen-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class JailCapsError(RuntimeError):
    """The jail worker lacks what bwrap needs to map the user's uid."""


def _libc() -> ctypes.CDLL:
    libc = load_libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    libc.syscall.restype = ctypes.c_long
    return libc


def keep_only_setfcap() -> None:
    """For uid 0 in the netns user namespace (the production chain): bwrap maps the
    user's uid onto our uid 0, and since Linux 5.12 a user namespace may map its
    parent's uid 0 only if its creator held CAP_SETFCAP (verify_root_map). Keep
    exactly that capability across the exec of bwrap (uid 0 without
    SECBIT_NOROOT: the bounding set becomes bwrap's permitted set), nothing else.
    bwrap's own --cap-drop ALL empties every set of the sandbox. Raises
    JailCapsError when the capability is already gone: fail closed, say how."""
    if os.getuid() != 0:
        return  # an ordinary user: bwrap maps the sandbox uid to our own, no cap needed
    caps = capability_sets()
    if not (caps["CapEff"] >> CAP_SETFCAP) & 1 or not (caps["CapBnd"] >> CAP_SETFCAP) & 1:
        raise JailCapsError(
            "jail worker is uid 0 without CAP_SETFCAP: bwrap cannot map the user's uid onto "
            "uid 0 (Linux >= 5.12). Fork the jail worker before dropping every capability "
            "(exec_jail keeps only CAP_SETFCAP, for bwrap)"
        )
    libc = _libc()

    def prctl(*args: int) -> int:
        res = libc.prctl(*args, *([0] * (5 - len(args))))
        if res < 0:
            err = ctypes.get_errno()
            raise JailCapsError(f"prctl{args}: {os.strerror(err)}")
        return res

    if prctl(_PR_GET_SECUREBITS) & _SECBIT_NOROOT:
        raise JailCapsError(
            "jail worker has SECBIT_NOROOT set: bwrap would start without CAP_SETFCAP "
            "and fail to map the user's uid; do not lock securebits before exec_jail"
        )
    prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(last_cap() + 1):
        if cap != CAP_SETFCAP and (caps["CapBnd"] >> cap) & 1:
            prctl(_PR_CAPBSET_DROP, cap)  # needs CAP_SETPCAP: raises clearly without it
    nr = _SYS_CAPSET.get(os.uname().machine)
    if nr is None:
        raise JailCapsError(f"capset: unsupported architecture {os.uname().machine}")
    version3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit data structs
    hdr = ctypes.create_string_buffer(struct.pack("Ii", version3, 0))
    keep = 1 << CAP_SETFCAP
    data = ctypes.create_string_buffer(struct.pack("IIIIII", keep, keep, 0, 0, 0, 0))
    if libc.syscall(nr, hdr, data) != 0:
        raise JailCapsError(f"capset: {os.strerror(ctypes.get_errno())}")
    left = capability_sets()
    if left["CapEff"] != keep or left["CapPrm"] != keep or left["CapBnd"] != keep:
        raise JailCapsError(f"capabilities not reduced to CAP_SETFCAP: {left}")


RLIMITS = {"data": resource.RLIMIT_DATA, "nproc": resource.RLIMIT_NPROC, "cpu": resource.RLIMIT_CPU}


def set_rlimits(limits: dict[str, int]) -> None:
    """The resource caps (--memory, --max-procs, --cpu-time), inherited by bwrap and
    everything in the sandbox. Soft = hard, so the sandbox cannot raise them, except
    CPU time: hard = soft + 1 s, so the process gets SIGXCPU (which says why) before
    the SIGKILL a hard limit sends. An unknown name or a failing setrlimit raises:
    never exec without a cap that was asked for."""
    for name, value in limits.items():
        if name not in RLIMITS:
            raise ValueError(f"unknown resource limit {name!r}")
        res = RLIMITS[name]
        _, host_hard = resource.getrlimit(res)
        hard = value + 1 if name == "cpu" else value
        if host_hard != resource.RLIM_INFINITY:
            # already capped lower by the host: keep the host's
            value, hard = min(value, host_hard), min(hard, host_hard)
        resource.setrlimit(res, (value, hard))


def exec_jail(
    policy: SessionPolicy,
    *,
    status_fd: int,
    block_fd: int | None = None,
    covers: Sequence[Cover] | None = None,
) -> NoReturn:
    """Exec bwrap with the jail's argv and the policy's (already scrubbed) env.

    `covers`: the list from `jail_covers(policy)` that the caller computed before the
    fork and will hand to `remove_placeholders` after the jail exits (None: computed
    here). Raises with what failed (EnvError, ProtectError, ValueError for a refused
    mount, JailCapsError, LayoutError, RuntimeError from seccomp, OSError) when the
    jail cannot be set up as promised; never execs a weaker jail."""
    check_env(policy.env)
    keep_only_setfcap()
    layout = detect_layout()
    if covers is None:  # the parent normally passes the list it will clean up after
        covers = jail_covers(policy)
    program = seccomp.build_seccomp_program()
    fds = JailFds(
        seccomp=open_data_fd("seccomp", program),
        json_status=status_fd,
        hosts=open_data_fd("hosts", hosts_file().encode()),
        resolv=open_data_fd("resolv", resolv_conf(policy.dns_port).encode()),
        nsswitch=open_data_fd("nsswitch", nsswitch_conf(layout.nsswitch).encode()),
        empty=tuple(open_data_fd("placeholder", c.data) for c in covers if c.kind == "file"),
        block=block_fd,
    )
    argv = build_bwrap_argv(policy, layout, fds, covers)
    keep = [fds.seccomp, fds.json_status, fds.hosts, fds.resolv, fds.nsswitch, *fds.empty]
    if block_fd is not None:
        keep.append(block_fd)
    for fd in keep:
        os.set_inheritable(fd, True)
    close_fds_except(keep)

    # Ignored dispositions survive exec (Python ignores PIPE/XFSZ; a parent may ignore
    # CHLD, which would break bwrap's waitpid): every signal back to its default,
    # nothing blocked, then ignore exactly the terminal ones for bwrap.
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue  # real-time signals libc reserves for itself
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in BWRAP_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    # Own process group: a kill(0, SIGKILL) inside cannot reach the supervisor's group.
    if os.getpgrp() != os.getpid():  # a session leader already leads its own group
        os.setpgid(0, 0)
    if os.isatty(0):
        # Foreground group of the terminal, so Ctrl-C/resize reach the sandbox
        # (SIGTTOU is ignored above, else tcsetpgrp from the background stops us).
        try:
            os.tcsetpgrp(0, os.getpgrp())
        except OSError as exc:
            if exc.errno != errno.ENOTTY:  # ENOTTY: a tty, but not our controlling one
                raise
    set_rlimits(policy.rlimits)
    os.execve(layout.bwrap, argv, dict(policy.env))  # noqa: S606 - argv is built, no shell
