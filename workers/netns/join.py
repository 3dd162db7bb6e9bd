"""Joining pasta's namespaces from a worker forked by the supervisor (issue 10).

pasta creates the sandbox's user and network namespace and, once its tap is set up,
execs its command (pasta's child waits for pasta's SIGUSR1 before exec). That command
is a *holder*: a shell that announces itself on a unix socket and then blocks reading
it until the supervisor closes its end (or dies). The netns worker, forked from the
already-initialised supervisor rather than started by pasta as a new interpreter,
learns the holder's host pid from the kernel (SCM_CREDENTIALS: a pid the sender cannot
choose) and joins its user and network namespaces with setns(). That saves an
interpreter start and every import on the path to the agent's first instruction.

What the worker joins is exactly what pasta made: the holder is pasta's child (checked:
its parent is pasta), it is pid 1 of pasta's pid namespace (checked), and the pidfd
pins the process, so a reused pid cannot redirect the join. The worker joins the user
namespace first (it then holds every capability there, as root of pasta's namespace,
like the worker pasta used to start) and the network namespace second, and pasta's
pid namespace for its children: the worker proper is such a child (netns/main.py), so
the jail lives, as before, in a pid namespace whose first process is pasta's command:
when the holder exits, the kernel kills whatever is left in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import struct

from agentpen.workers.netns.errors import NetnsSetupError

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
HOLDER_NAME = "agentpen-netns-holder"  # $0 of the holder shell: how tests and ps name it


def holder_argv() -> list[str]:
    """Pure: pasta's command, whose standard input is the holder's socket (pasta leaves
    its stdin alone and hands it to its child). One byte on it says "pasta is ready,
    this is me"; the read then blocks until every other end of the socket is closed (the
    supervisor's, at teardown or death), and the holder's exit ends pasta. No exec
    after the shell: a builtin `read` keeps one small process per session."""
    return ["/bin/sh", "-c", "printf r >&0 || exit 1; read -r _ || exit 0", HOLDER_NAME]


def parse_ucred(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """Pure: the sender's pid from recvmsg()'s ancillary data, or None."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            pid, _uid, _gid = _UCRED.unpack_from(data)
            return pid if pid > 0 else None
    return None


def read_holder(sock: socket.socket, timeout: float) -> int:
    """Wait for the holder's byte; return its host pid (the kernel's, SO_PASSCRED was
    set on this end before pasta started). EOF means pasta died before its command ran."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        raise NetnsSetupError(f"pasta did not start its namespace within {timeout:.0f} s",
                              "run agentpen --check; pasta may be blocked on this host")
    data, anc, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(_UCRED.size))
    if not data:
        raise NetnsSetupError("pasta exited before its namespace was ready (see its messages)",
                              "run agentpen --check")
    pid = parse_ucred(anc)
    if data != b"r" or pid is None:
        raise NetnsSetupError("unexpected announcement from pasta's namespace holder",
                              "run agentpen again; if it recurs, report it")
    return pid


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def check_holder(fields: dict[str, str], pasta_pid: int) -> str | None:
    """Pure: why /proc/PID/status is not pasta's holder, or None when it is: pasta's
    child, and pid 1 of a pid namespace of its own (pasta clones it with CLONE_NEWPID)."""
    if fields.get("PPid") != str(pasta_pid):
        return f"its parent is {fields.get('PPid')}, not pasta ({pasta_pid})"
    nspid = fields.get("NSpid", "").split()
    if len(nspid) < 2 or nspid[-1] != "1":
        return f"it is not the first process of a new pid namespace (NSpid {' '.join(nspid)})"
    return None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _setns(fd: int, nstype: int, what: str) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise NetnsSetupError(f"could not join pasta's {what}: {os.strerror(err)}",
                              "run agentpen --check (user namespaces must be available)")


def join(holder: int, pasta_pid: int) -> None:
    """setns() into the holder's user, then network, namespace, and its pid namespace
    for our children. Single-threaded only (setns(CLONE_NEWUSER) refuses a process with
    threads): call it in a fresh fork."""
    try:
        pidfd = os.pidfd_open(holder)
    except OSError as exc:
        raise NetnsSetupError(f"pasta's namespace holder (pid {holder}) is gone: {exc}",
                              "run agentpen again (something killed pasta's command)") from None
    try:
        try:
            why = check_holder(_status_fields(holder), pasta_pid)
        except OSError as exc:
            why = f"unreadable: {exc}"
        if why is None and select.select([pidfd], [], [], 0)[0]:
            why = "it exited"  # the status read may have been of a reused pid
        if why is not None:
            raise NetnsSetupError(f"pid {holder} is not pasta's namespace holder: {why}",
                                  "run agentpen again; if it recurs, report it")
        # Linux >= 5.8 takes a pidfd and joins both at once, atomically.
        if _libc.setns(pidfd, CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
            return
        if ctypes.get_errno() != 22:  # EINVAL: an older kernel; anything else is real
            err = ctypes.get_errno()
            raise NetnsSetupError(f"could not join pasta's namespaces: {os.strerror(err)}",
                                  "run agentpen --check (user namespaces must be available)")
        fds = [os.open(f"/proc/{holder}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
               for ns in ("user", "net", "pid")]
        try:
            if select.select([pidfd], [], [], 0)[0]:  # the files may be of a reused pid
                raise NetnsSetupError(f"pasta's namespace holder (pid {holder}) exited",
                                      "run agentpen again (something killed pasta's command)")
            _setns(fds[0], CLONE_NEWUSER, "user namespace")
            _setns(fds[1], CLONE_NEWNET, "network namespace")
            _setns(fds[2], CLONE_NEWPID, "pid namespace")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    finally:
        os.close(pidfd)
