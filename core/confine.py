"""Worker self-confinement: the proxy worker (once it has imported what it needs) and
the netns worker (once it has forked the jail) apply it.

Both parse attacker bytes (ClientHellos, DNS queries), so if one is ever subverted it
should be unable to do more than its job: accept, resolve, connect, read, write, wait. A denylist (the worker
needs the ordinary file and socket calls of Python, libuv and the resolver) returning
EPERM, on top of no_new_privs. Syscalls of a foreign ABI (i386/x32) kill the process
(libseccomp's default bad-arch action).
"""

from __future__ import annotations

import errno

from agentpen.core import osutil

# syscall -> why the proxy worker never needs it
DENIED: dict[str, str] = {
    "execve": "no program to run: a subverted worker must not get a shell",
    "execveat": "same as execve",
    "ptrace": "no debugging or injecting into other processes",
    "process_vm_readv": "no reading other processes' memory",
    "process_vm_writev": "no writing other processes' memory",
    "kcmp": "no probing other processes' kernel objects",
    "pidfd_getfd": "no stealing descriptors from other processes",
    "perf_event_open": "kernel attack surface, side channels",
    "mount": "no filesystem changes",
    "umount2": "no filesystem changes",
    "pivot_root": "no filesystem changes",
    "chroot": "no filesystem changes",
    "move_mount": "new mount API",
    "open_tree": "new mount API",
    "fsopen": "new mount API",
    "fsconfig": "new mount API",
    "fsmount": "new mount API",
    "fspick": "new mount API",
    "mount_setattr": "new mount API",
    "unshare": "no new namespaces (would escape the host-netns view)",
    "setns": "no entering other namespaces",
    "bpf": "kernel attack surface",
    "userfaultfd": "kernel exploitation primitive",
    "io_uring_setup": "io_uring: large kernel attack surface, bypasses per-syscall filtering",
    "io_uring_enter": "io_uring",
    "io_uring_register": "io_uring",
    "keyctl": "kernel keyrings are not namespaced",
    "add_key": "kernel keyrings",
    "request_key": "kernel keyrings",
    "kexec_load": "kernel replacement",
    "kexec_file_load": "kernel replacement",
    "init_module": "kernel modules",
    "finit_module": "kernel modules",
    "delete_module": "kernel modules",
    "reboot": "host control",
    "swapon": "host control",
    "swapoff": "host control",
    "acct": "host control",
    "syslog": "kernel log can leak addresses",
    "iopl": "raw I/O ports",
    "ioperm": "raw I/O ports",
    "quotactl": "filesystem control",
    "open_by_handle_at": "bypasses path-based access checks",
    "name_to_handle_at": "pairs with open_by_handle_at",
    "personality": "can turn off ASLR for later code",
    "uselib": "obsolete loader entry point",
}

# clone(2) flag bits that create namespaces: refused, plain fork/thread creation allowed.
_CLONE_NS = {
    "CLONE_NEWTIME": 0x80, "CLONE_NEWNS": 0x20000, "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000, "CLONE_NEWNET": 0x40000000,
}
_TIOCSTI = 0x5412  # fake terminal input: a worker sharing the user's tty must not type into it


class ConfinementError(RuntimeError):
    """The worker could not confine itself; it must not serve."""


def confine() -> list[str]:
    """no_new_privs + seccomp denylist for this process and the threads it starts later.
    Returns the refused syscall names (for the worker's start-up event)."""
    try:
        seccomp = osutil.import_pyseccomp()
    except ImportError as exc:  # fail closed: never serve unconfined
        raise ConfinementError(
            f"pyseccomp unavailable ({exc}); install agentpen's dependencies") from None
    try:
        osutil.set_no_new_privs()
        if osutil.capability_sets().get("CapEff", 0):
            osutil.drop_all_capabilities()  # started by root: keep nothing
        flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        eperm = seccomp.ERRNO(errno.EPERM)
        for name in DENIED:
            flt.add_rule(eperm, name)
        for bit in _CLONE_NS.values():
            flt.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, bit, bit))
        # clone3 passes its flags in memory seccomp cannot read: ENOSYS makes glibc fall
        # back to clone(2), whose flags the rules above do check.
        flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        flt.add_rule(eperm, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
        flt.load()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfinementError(f"could not apply the proxy worker's seccomp filter: {exc}") from exc
    return sorted([*DENIED, "clone(CLONE_NEW*)", "clone3", "ioctl(TIOCSTI)"])
