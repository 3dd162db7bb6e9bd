"""Small Linux process primitives the workers share: parent-death signal,
no_new_privs, dropping capabilities, closing inherited descriptors."""

from __future__ import annotations

import ctypes
import os
import signal
import struct

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

# Sonames fixed by their ABI: ctypes.util.find_library() would fork `/sbin/ldconfig -p`
# (5-10 ms, and a copy-on-write fork of the whole process) to find the same names.
KNOWN_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def import_pyseccomp() -> Any:
    """Import pyseccomp without its two find_library() calls at import time (each one
    runs ldconfig: ~20 ms on every worker's start-up path). The known sonames are
    tried first; anything else, or a soname that does not load, goes to the real
    find_library as before."""
    import sys

    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]
    from ctypes import util as ctypes_util  # pyseccomp imports it anyway

    real = ctypes_util.find_library

    def find_library(name: str) -> str | None:
        soname = KNOWN_SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        return real(name)

    ctypes_util.find_library = find_library
    try:
        import pyseccomp
    finally:
        ctypes_util.find_library = real
    return pyseccomp


def load_libc() -> ctypes.CDLL:
    """glibc by its soname; find_library() runs `ldconfig -p` (5-10 ms a process)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc (musl...): ask the loader's search
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = load_libc()
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECUREBITS = 28
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_capset = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)


def _prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    res = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return res


def set_pdeathsig(sig: int = signal.SIGKILL, *, expected_parent: int | None = None) -> None:
    """Die with the parent. If the parent is already gone (the race between fork
    and this call), die now rather than live on as an orphan."""
    _prctl(PR_SET_PDEATHSIG, sig)
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


def set_name(name: bytes) -> None:
    """The process's comm (what ps and /proc/PID/comm show; 15 bytes at most)."""
    buf = ctypes.create_string_buffer(name[:15])
    _prctl(15, ctypes.addressof(buf))  # PR_SET_NAME


def replace_environment(env: dict[str, str]) -> None:
    """A forked worker's environment becomes `env`, and the user's is wiped from memory
    where it is known to be: os.environ and libc's copy are replaced, and the strings the
    kernel put on the stack at the supervisor's exec (what /proc/PID/environ shows, and
    what a fork inherits) are overwritten with zeros. Nothing refers to them any more:
    Python and libc copied what they use at start-up."""
    os.environ.clear()
    os.environ.update(env)
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()  # fields[0] is field 3 (state)
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
    if 0 < start < end:
        ctypes.memset(ctypes.c_void_p(start), 0, end - start)


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def no_new_privs() -> bool:
    return bool(_prctl(PR_GET_NO_NEW_PRIVS))


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_all_capabilities() -> None:
    """Empty every capability set of this process for good: bounding, ambient,
    inheritable, permitted and effective, and lock the securebits so that root in
    this user namespace cannot regain them through exec."""
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(last_cap() + 1):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != 22:  # EINVAL: cap unknown to this kernel
                raise
    bits = (
        SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
    )
    try:
        _prctl(PR_SET_SECUREBITS, bits)
    except OSError as exc:
        if exc.errno != 1:  # EPERM without CAP_SETPCAP: nothing to lock, no caps to regain
            raise
    header = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # two empty __user_cap_data_struct: effective, permitted, inheritable
    if _SYS_capset is None:
        raise OSError("capset: unsupported architecture")
    hdr = ctypes.create_string_buffer(header)
    dat = ctypes.create_string_buffer(data)
    if _libc.syscall(_SYS_capset, hdr, dat) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def capability_sets(pid: int | str = "self") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a process, from /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                key, val = line.split(":", 1)
                out[key] = int(val.strip(), 16)
    return out


def close_fds_except(keep: set[int] | list[int] | tuple[int, ...]) -> None:
    """Close every descriptor above 2 that is not in `keep`."""
    keep_sorted = sorted({fd for fd in keep if fd > 2})
    low = 3
    for fd in keep_sorted:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def reset_signals_for_exec() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; an ignored disposition survives exec,
    so restore the defaults a normal program expects, and unblock everything."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


CLONE_NEWUSER = 0x10000000
_libc.unshare.argtypes = [ctypes.c_int]


def wait_single_threaded(timeout: float = 5.0) -> None:
    """Join every other Python thread (libraries such as pyroute2 leave helpers that
    end on their own); unshare(CLONE_NEWUSER) refuses a multi-threaded process."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    while len(os.listdir("/proc/self/task")) > 1:  # a native thread still exiting
        if time.monotonic() > deadline:
            raise OSError(f"{len(os.listdir('/proc/self/task'))} threads still running; "
                          "unshare(CLONE_NEWUSER) needs a single-threaded process")
        os.sched_yield()


def enter_own_user_namespace(uid: int, gid: int) -> None:
    """unshare(CLONE_NEWUSER) and map `uid`/`gid` inside to our current ids outside.

    The netns worker runs as root of pasta's user namespace. Before it drops its
    capabilities it moves into a child namespace where it is the user's own uid:
    bwrap (unprivileged, non-root) can then map that uid into the sandbox; as root it
    could not, since mapping a parent's uid 0 needs CAP_SETFCAP (Linux >= 5.12). The
    child namespace also holds no capability over the network namespace, which stays
    owned by pasta's. Must be called single-threaded."""
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    wait_single_threaded()
    if _libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {outer_uid} 1\n")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {outer_gid} 1\n")


_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
CLONE_NEWNS = 0x00020000


def mount_fresh_proc() -> None:
    """Mount a /proc that matches our pid namespace.

    pasta runs its command in new pid and mount namespaces but leaves the host's /proc
    mounted, so pids in /proc are not ours and bwrap (which opens /proc/<pid>/ns/*)
    fails. Root of pasta's user namespace owns both namespaces and may mount it."""
    if _libc.unshare(CLONE_NEWNS) != 0:  # our own mount namespace: nothing propagates out
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"make / private: {os.strerror(err)}")
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc.mount(b"proc", b"/proc", b"proc", flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount proc on /proc: {os.strerror(err)}")
