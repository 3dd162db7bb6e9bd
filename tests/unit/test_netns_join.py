"""Joining pasta's namespaces from a forked worker (workers/netns/join.py) and the
pyroute2 cross-check after the rtnetlink gate (workers/netns/main.CrossCheck)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess

import pytest
from agentpen.workers.netns import join
from agentpen.workers.netns import main as netns_main
from agentpen.workers.netns.errors import NetnsSetupError


def test_holder_is_a_shell_that_announces_on_stdin_and_blocks_until_eof():
    argv = join.holder_argv()
    assert argv[0] == "/bin/sh" and argv[-1] == join.HOLDER_NAME
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    proc = subprocess.Popen(argv, stdin=theirs, stdout=subprocess.DEVNULL)
    theirs.close()
    try:
        assert join.read_holder(ours, 10) == proc.pid  # the kernel's pid, not a claimed one
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.2)  # still holding: no EOF yet
        ours.close()
        assert proc.wait(10) == 0  # EOF: the holder (and so pasta) ends
    finally:
        proc.kill()
        proc.wait()


def test_read_holder_fails_closed_on_eof_garbage_and_silence():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    b.close()
    with pytest.raises(NetnsSetupError, match="exited before"):
        join.read_holder(a, 1)  # pasta died before its command ran
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    b.send(b"x")
    with pytest.raises(NetnsSetupError, match="unexpected"):
        join.read_holder(a, 1)
    with pytest.raises(NetnsSetupError, match="within"):
        join.read_holder(a, 0.05)  # nothing more comes


def test_parse_ucred_takes_the_kernels_pid_only():
    creds = struct.pack("iII", 4242, 1000, 1000)
    assert join.parse_ucred([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)]) == 4242
    assert join.parse_ucred([]) is None
    assert join.parse_ucred([(socket.SOL_SOCKET, socket.SCM_RIGHTS, creds)]) is None
    assert join.parse_ucred([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds[:8])]) is None
    assert join.parse_ucred([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
                              struct.pack("iII", 0, 0, 0))]) is None


@pytest.mark.parametrize("fields,why", [
    ({"PPid": "10", "NSpid": "77 1"}, None),
    ({"PPid": "11", "NSpid": "77 1"}, "parent"),  # not pasta's child
    ({"PPid": "10", "NSpid": "77"}, "pid namespace"),  # in the host's pid namespace
    ({"PPid": "10", "NSpid": "77 3"}, "pid namespace"),  # not its first process
    ({}, "parent"),
])
def test_check_holder(fields, why):
    got = join.check_holder(fields, 10)
    assert (got is None) if why is None else (why in got)


def test_join_refuses_a_process_that_is_not_pastas_holder():
    # Positive control of the check itself: our own child is no holder (no new pid
    # namespace), so nothing is joined and the reason is given.
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(NetnsSetupError, match="not pasta's namespace holder"):
            join.join(proc.pid, os.getpid())
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(NetnsSetupError, match="gone"):
        join.join(proc.pid, os.getpid())  # reaped: no pidfd, no join


# -- the cross-check ----------------------------------------------------------------------

GATE = {"closed": True, "links": [{"index": 1, "name": "lo", "up": True}], "addresses": [],
        "routes": {"ipv4": 3, "ipv6": 1, "all_on_loopback": True}, "default_route": False}


class _FakeVerifier:
    def __init__(self, sock):
        self.sock = sock


def _cross(answer: bytes | None):
    ours, theirs = socket.socketpair()
    cross = netns_main.CrossCheck(_FakeVerifier(ours), GATE)
    if answer is not None:
        theirs.sendall(answer)
    theirs.close()
    out = None
    while out is None and cross.sock is not None:
        out = cross.on_readable()
    return out


def test_cross_check_confirms_an_equal_state():
    body = _cross((json.dumps({"state": GATE}) + "\n").encode())
    assert body["event"]["outcome"] == "success"
    assert body["agentpen"] == {"step": "netns-cross-checked", "completed": True, "checked_by": "pyroute2"}


@pytest.mark.parametrize("answer,why", [
    ({"state": {**GATE, "addresses": [{"link": "eth0", "address": "10.0.2.15", "prefixlen": 24}]}},
     "disagree"),
    ({"error": "the sandbox network namespace is not closed: eth0 has 10.0.2.15"}, "not closed"),
    (None, "without reporting"),
    ("garbage", "unreadable"),
])
def test_cross_check_fails_closed(answer, why):
    raw = None if answer is None else (answer if isinstance(answer, str) else json.dumps(answer))
    with pytest.raises(netns_main._Fatal, match=why):
        _cross(None if raw is None else raw.encode())


def test_cross_check_not_answered_is_reported_as_incomplete():
    ours, _theirs = socket.socketpair()
    cross = netns_main.CrossCheck(_FakeVerifier(ours), GATE)
    body = cross.incomplete()
    assert body["event"]["outcome"] == "unknown" and body["agentpen"]["completed"] is False
    assert cross.sock is None


def test_cross_check_start_hands_the_verifier_a_netlink_socket():
    """Not before ``start()`` (serve() calls it CROSSCHECK_AFTER the jail started): then
    one NETLINK_ROUTE socket of this namespace, which the verifier dumps through."""
    ours, theirs = socket.socketpair()
    cross = netns_main.CrossCheck(_FakeVerifier(ours), GATE)
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(1)  # nothing sent at construction
    cross.start()
    theirs.setblocking(True)
    theirs.settimeout(5)
    msg, fds, _, _ = socket.recv_fds(theirs, 16, 2)
    try:
        assert msg == b"v" and len(fds) == 1
        nl = socket.socket(fileno=os.dup(fds[0]))
        assert (nl.family, nl.proto) == (socket.AF_NETLINK, socket.NETLINK_ROUTE)
        nl.close()
    finally:
        for fd in fds:
            os.close(fd)
        cross.close()
        theirs.close()
    assert 0 < netns_main.CROSSCHECK_AFTER <= 1.0


def test_a_dead_verifier_is_seen_before_the_cross_check_starts():
    """The worker refuses to report "verified" once the verifier's end is closed."""
    ours, theirs = socket.socketpair()
    cross = netns_main.CrossCheck(_FakeVerifier(ours), GATE)
    assert not cross.gone()  # alive and silent: the control
    theirs.close()
    assert cross.gone()
    with pytest.raises(netns_main._Fatal, match="without reporting"):
        while cross.on_readable() is None and cross.sock is not None:
            pass
