"""Descriptors that cross into the namespace: find sockets that belong to another netns.

pasta 2023 leaves the host-side listening socket of every ``-t`` (``--publish``) door
open and inheritable in the command it runs (measured: fd 5 in the netns worker). A
socket stays in the network namespace it was made in, so such an fd, passed on to the
jail, would put a host-namespace socket in the sandbox. The netns worker closes every
descriptor it does not know (``core.osutil.close_fds_except``) and proves the result
with ``assert_no_foreign_sockets()``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from agentpen.workers.netns.errors import NetnsSetupError

SIOCGSKNS = 0x894C  # linux/sockios.h: open the netns a socket belongs to (Linux >= 4.9)


def _netns_inode(fd: int) -> int | None:
    """The inode of the socket's netns; -1 when the kernel will not say (EPERM: it needs
    CAP_NET_ADMIN over that netns, which we hold over ours only: so, a foreign one)."""
    try:
        ns_fd = fcntl.ioctl(fd, SIOCGSKNS)
    except OSError as exc:
        return -1 if exc.errno == errno.EPERM else None
    try:
        return os.fstat(ns_fd).st_ino
    finally:
        os.close(ns_fd)


def open_fds() -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc/self/fd") if n.isdigit())


def foreign_netns_sockets(expected: frozenset[int] = frozenset()) -> list[int]:
    """Open descriptors that are sockets of another network namespace.

    Exact while this process holds CAP_NET_ADMIN over its own netns (call it before the
    capability drop); afterwards every socket reads as foreign (fail closed)."""
    own = os.stat("/proc/self/ns/net").st_ino
    found = []
    for fd in open_fds():
        if fd in expected:
            continue
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue  # closed meanwhile (the listdir fd itself)
        ino = _netns_inode(fd)
        if ino is not None and ino != own:
            found.append(fd)
    return found


def assert_no_foreign_sockets(expected: frozenset[int] = frozenset()) -> None:
    """`expected`: descriptors known to be the host's on purpose (the supervisor channel,
    a unix socketpair created in the host namespace; the jail never inherits it)."""
    fds = foreign_netns_sockets(expected)
    if fds:
        raise NetnsSetupError(
            f"descriptors {fds} are sockets of another network namespace (inherited from "
            "pasta or the supervisor)",
            "close every inherited descriptor except the channel before anything runs "
            "(core.osutil.close_fds_except)",
        )
