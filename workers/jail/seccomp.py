"""The jail's seccomp program: a table of blocked syscalls, each with its reason.

The table is data (``BLOCKED`` and ``ARG_RULES``); ``build_seccomp_program`` turns it
into classic BPF with libseccomp (via pyseccomp) for ``bwrap --seccomp FD``. bwrap
loads it just before exec'ing the command, so bwrap itself needs none of the blocked
calls. Default action: allow. Blocked calls fail with EPERM so that agents' tools
degrade gracefully; clone3 fails with ENOSYS so that libc falls back to clone(2),
whose flags a classic BPF filter can inspect (clone3 passes them in memory).

Architectures: only the native one is in the filter. Any other audit arch (i386 via
int 0x80 on x86_64, arm32 on aarch64) hits the bad-arch action, KILL_PROCESS, and
libseccomp's x86_64 filter also sends x32 syscall numbers (>= 0x40000000) there,
so a filter cannot be sidestepped by switching ABI.
"""

from __future__ import annotations

import errno
import os

from agentpen.core.record import record

# syscall -> why it is refused. Flatpak's list, plus the mount API and io_uring.
BLOCKED: dict[str, str] = {
    # Reading or steering other processes
    "ptrace": "inspect and steer other processes (read secrets from memory, inject code)",
    "process_vm_readv": "read another process's memory",
    "process_vm_writev": "write another process's memory",
    "kcmp": "compare kernel objects of other processes (ASLR and fd probing)",
    # Kernel keyrings: shared with the host user's session keyring
    "keyctl": "kernel keyrings are not namespaced: host user's keys (kerberos, ecryptfs...)",
    "add_key": "kernel keyrings are not namespaced",
    "request_key": "kernel keyrings are not namespaced",
    # The whole mount API: the filesystem view is bwrap's and must stay so
    "mount": "change the filesystem view (uncover hidden paths, remount read-write)",
    "umount": "remove a mount that hides or protects a path",
    "umount2": "remove a mount that hides or protects a path",
    "fsopen": "new mount API: create a filesystem context",
    "fsconfig": "new mount API: configure a filesystem context",
    "fsmount": "new mount API: create a mount",
    "fspick": "new mount API: reconfigure an existing mount (e.g. read-write)",
    "move_mount": "new mount API: attach or move a mount",
    "open_tree": "new mount API: clone a mount tree",
    "mount_setattr": "new mount API: change mount flags (drop read-only)",
    "pivot_root": "change the root of the mount namespace",
    "chroot": "change root: classic confusion/escape primitive for setuid helpers",
    # Kernel attack surface with a long CVE record and no use for a coding agent
    "bpf": "load BPF programs: large kernel attack surface",
    "perf_event_open": "performance counters: side channels and kernel attack surface",
    "userfaultfd": "stall the kernel at a chosen page fault: exploitation primitive",
    "io_uring_setup": "io_uring bypasses seccomp for the operations it performs",
    "io_uring_enter": "io_uring bypasses seccomp for the operations it performs",
    "io_uring_register": "io_uring bypasses seccomp for the operations it performs",
    # Whole-machine operations (also need privileges the sandbox lacks: defence in depth)
    "kexec_load": "load a new kernel",
    "kexec_file_load": "load a new kernel",
    "init_module": "load a kernel module",
    "finit_module": "load a kernel module",
    "delete_module": "unload a kernel module",
    "reboot": "reboot or halt the machine",
    "swapon": "change swap: whole-machine resource",
    "swapoff": "change swap: whole-machine resource",
    "clock_settime": "set the system clock (breaks TLS validity checks, logs)",
    "clock_adjtime": "adjust the system clock",
    "settimeofday": "set the system clock",
    "adjtimex": "adjust the system clock",
    "stime": "set the system clock (legacy)",
    "acct": "switch process accounting to a chosen file",
    "quotactl": "filesystem quota control",
    "syslog": "read the kernel log (kernel addresses, host activity)",
    "vhangup": "hang up the controlling terminal shared with the host shell",
    "name_to_handle_at": "file handles address inodes outside the mount view",
    "open_by_handle_at": "open an inode by handle, bypassing the mount view (shocker escape)",
    "lookup_dcookie": "kernel-internal path lookup for profilers",
    "uselib": "obsolete loader entry point with a bug history",
    "setns": "join another namespace (defence in depth beside --disable-userns)",
    "nfsservctl": "kernel NFS server control (obsolete)",
}

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# CLONE_NEWTIME shares its bit with CSIGNAL in clone(2), so it is only refused in unshare.
NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": CLONE_NEWNS,
    "CLONE_NEWCGROUP": CLONE_NEWCGROUP,
    "CLONE_NEWUTS": CLONE_NEWUTS,
    "CLONE_NEWIPC": CLONE_NEWIPC,
    "CLONE_NEWUSER": CLONE_NEWUSER,
    "CLONE_NEWPID": CLONE_NEWPID,
    "CLONE_NEWNET": CLONE_NEWNET,
}

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
LOW32 = 0xFFFFFFFF
PER_LINUX = 0


@record(frozen=True)
class ArgRule:
    """Refuse `syscall` when (arg[index] & mask) == value; `errno_` is the error."""

    syscall: str
    index: int
    mask: int
    value: int
    reason: str
    errno_: int = errno.EPERM


ARG_RULES: list[ArgRule] = [
    # The kernel compares the request as an unsigned int: match the low 32 bits only,
    # or TIOCSTI | 1 << 32 would slip past a full 64-bit compare (CVE-2019-10063 style).
    ArgRule("ioctl", 1, LOW32, TIOCSTI, "TIOCSTI: push keystrokes into the host terminal"),
    ArgRule("ioctl", 1, LOW32, TIOCLINUX, "TIOCLINUX: console selection paste injects input"),
    *(
        ArgRule("clone", 0, flag, flag, f"clone({name}): new namespaces (nested sandbox games)")
        for name, flag in NAMESPACE_FLAGS.items()
    ),
    *(
        ArgRule("unshare", 0, flag, flag, f"unshare({name}): new namespaces")
        for name, flag in {**NAMESPACE_FLAGS, "CLONE_NEWTIME": CLONE_NEWTIME}.items()
    ),
]

# personality(2) other than plain PER_LINUX re-enables READ_IMPLIES_EXEC,
# ADDR_NO_RANDOMIZE, MMAP_PAGE_ZERO...: refused like flatpak does (the 0xffffffff
# query included; libc does not use it).
PERSONALITY_REASON = "personality flags that disable ASLR or make data executable"

# Not a rule but an outcome: clone3 passes flags in memory that BPF cannot read.
CLONE3_REASON = "clone3 flags live in memory seccomp cannot inspect: ENOSYS makes libc use clone"

_ARCHES = {"x86_64": "X86_64", "aarch64": "AARCH64"}


def native_arch() -> str:
    return os.uname().machine  # platform.machine(), without importing platform (~2 ms)


def rule_table() -> list[tuple[str, str, str]]:
    """(syscall, condition, reason) rows, for docs and `agentpen config show`."""
    rows = [(name, "always", why) for name, why in BLOCKED.items()]
    rows += [
        (r.syscall, f"arg{r.index} & {r.mask:#x} == {r.value:#x}", r.reason) for r in ARG_RULES
    ]
    rows.append(("personality", f"arg0 != {PER_LINUX:#x}", PERSONALITY_REASON))
    rows.append(("clone3", "always (ENOSYS)", CLONE3_REASON))
    return rows


_built: dict[str, bytes] = {}  # per architecture: the table is constant for a process


def build_seccomp_program(arch: str | None = None) -> bytes:
    """Classic BPF for bwrap --seccomp. Raises RuntimeError when the architecture is
    not supported or a syscall of the table is unknown to libseccomp (fail closed:
    a table that does not fully compile is not loaded partially). Built once per
    process and architecture (the netns worker builds it while pasta sets up the
    namespace; the jail, its fork, reuses it)."""
    arch = arch or native_arch()
    if arch not in _built:
        _built[arch] = _build(arch)
    return _built[arch]


def _build(arch: str) -> bytes:
    from agentpen.core.osutil import import_pyseccomp

    sc = import_pyseccomp()  # here: only the jail worker needs libseccomp

    if arch not in _ARCHES:
        raise RuntimeError(
            f"seccomp: architecture {arch!r} is not supported (x86_64, aarch64); "
            "agentpen will not run a sandbox without its syscall filter"
        )
    arch_token = getattr(sc.Arch, _ARCHES[arch])
    flt = sc.SyscallFilter(sc.ALLOW)
    if arch_token != sc.system_arch():
        flt.add_arch(arch_token)
        flt.remove_arch(sc.Arch.NATIVE)
    # Any other ABI (i386, x32, arm32) is killed: the table below is per-ABI.
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    eperm = sc.ERRNO(errno.EPERM)
    for name in (*BLOCKED, *(r.syscall for r in ARG_RULES), "personality", "clone3"):
        # -1 is libseccomp's "no such name"; other negatives are names that exist
        # on some arch but not this one (e.g. stime on x86_64), which are fine.
        if sc.resolve_syscall(arch_token, name) == -1:
            raise RuntimeError(f"seccomp: libseccomp does not know syscall {name!r}")
    for name in BLOCKED:
        flt.add_rule(eperm, name)
    for rule in ARG_RULES:
        flt.add_rule(
            sc.ERRNO(rule.errno_), rule.syscall,
            sc.Arg(rule.index, sc.MASKED_EQ, rule.mask, rule.value),
        )
    flt.add_rule(eperm, "personality", sc.Arg(0, sc.NE, PER_LINUX))
    flt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    fd = os.memfd_create("agentpen-seccomp-build", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            flt.export_bpf(f)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)
