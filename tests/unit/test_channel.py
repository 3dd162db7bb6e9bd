"""The supervisor <-> worker wire protocol (core/channel.py)."""

import os
import socket

import pytest
from agentpen.core.channel import (
    HEADER,
    MAGIC,
    MAX_INLINE,
    PROTOCOL_VERSION,
    Channel,
    MsgType,
    ProtocolError,
    channel_pair,
)


def test_roundtrip_carries_type_body_and_sender_credentials():
    sup, wk = channel_pair()
    wk.send(MsgType.EVENT, {"action": "x", "n": 1, "s": "ünï\u0000code"})
    msg = sup.recv()
    assert msg.type is MsgType.EVENT
    assert msg.body == {"action": "x", "n": 1, "s": "ünï\u0000code"}
    # The kernel, not the sender, says who sent it.
    assert msg.sender_pid == os.getpid()
    assert msg.sender_uid == os.getuid()


def test_file_descriptors_travel_with_their_message():
    sup, wk = channel_pair()
    r, w = os.pipe()
    wk.send(MsgType.FDS, {"names": ["pipe"]}, fds=[r])
    msg = sup.recv()
    assert msg.body == {"names": ["pipe"]} and len(msg.fds) == 1
    os.write(w, b"through")
    assert os.read(msg.fds[0], 16) == b"through"
    msg.close_fds()
    os.close(r)
    os.close(w)


def test_large_body_goes_through_a_sealed_memfd():
    sup, wk = channel_pair()
    body = {"allow": [f"host{i}.example.com" for i in range(20000)]}
    wk.send(MsgType.CONFIG, body)
    msg = sup.recv()
    assert msg.body == body
    assert msg.fds == []  # the blob descriptor is consumed and closed


def test_eof_is_none():
    sup, wk = channel_pair()
    wk.close()
    assert sup.recv() is None


@pytest.mark.parametrize(
    "packet, reason",
    [
        (b"A", "short"),
        (b"XX" + bytes([PROTOCOL_VERSION, 3]) + b"{}", "magic"),
        (MAGIC + bytes([PROTOCOL_VERSION + 1, 3]) + b"{}", "version"),
        (MAGIC + bytes([PROTOCOL_VERSION, 99]) + b"{}", "unknown message type"),
        (MAGIC + bytes([PROTOCOL_VERSION, 3]) + b"[1]", "object"),
        (MAGIC + bytes([PROTOCOL_VERSION, 3]) + b"\xff\xfe", "JSON"),
        (MAGIC + bytes([PROTOCOL_VERSION, 3]) + b'{"$blob":true}', "blob"),
    ],
)
def test_malformed_packets_are_protocol_errors(packet, reason):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sup = Channel(a)
    b.send(packet)
    with pytest.raises(ProtocolError, match=reason):
        sup.recv()


def test_oversized_packet_is_refused_not_truncated_silently():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sup = Channel(a)
    b.send(HEADER.pack(MAGIC, PROTOCOL_VERSION, 3) + b'{"x":"' + b"a" * (MAX_INLINE + 100) + b'"}')
    with pytest.raises(ProtocolError, match="truncated"):
        sup.recv()


def test_descriptors_of_a_bad_packet_are_closed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sup = Channel(a)
    r, w = os.pipe()
    import array

    b.sendmsg([b"junk"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ProtocolError):
        sup.recv()
    after = set(os.listdir("/proc/self/fd"))
    assert after <= before  # the received copy was closed
    os.close(r)
    os.close(w)


def test_channel_requires_seqpacket():
    a, b = socket.socketpair()
    with pytest.raises(ValueError):
        Channel(a)
    a.close()
    b.close()
