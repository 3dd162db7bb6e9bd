"""The stdlib rtnetlink dump: pure parser cases, and agreement with pyroute2 on this host."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from agentpen.workers.netns import rtnl, verify
from agentpen.workers.netns.errors import NetnsSetupError
from hypothesis import given, settings
from hypothesis import strategies as st


def attr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def msg(mtype: int, payload: bytes, flags: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), mtype, flags, 1, 0) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_parse_link_addr_route():
    link = rtnl.IFINFOMSG.pack(0, 1, 2, 0x1003, 0) + attr(rtnl.IFLA_IFNAME, b"eth0\0")
    assert rtnl.parse_link(link) == (2, "eth0", 0x1003)
    addr = rtnl.IFADDRMSG.pack(socket.AF_INET, 24, 0, 0, 2) \
        + attr(rtnl.IFA_ADDRESS, bytes([10, 0, 2, 2])) + attr(rtnl.IFA_LOCAL, bytes([10, 0, 2, 15]))
    assert rtnl.parse_addr(addr) == (2, socket.AF_INET, "10.0.2.15", 24)  # local, not peer
    route = rtnl.RTMSG.pack(socket.AF_INET6, 0, 0, 0, 254, 3, 0, 1, 0) \
        + attr(rtnl.RTA_TABLE, struct.pack("=I", 1000)) \
        + attr(rtnl.RTA_GATEWAY, bytes(15) + b"\1") + attr(rtnl.RTA_OIF, struct.pack("=i", 2))
    assert rtnl.parse_route(route) == {
        "family": socket.AF_INET6, "table": 1000, "type": 1, "dst": None, "dst_len": 0,
        "oif": 2, "gateway": "::1", "multipath": False}


def test_messages_split_and_reject_bad_lengths():
    data = msg(16, b"abcd") + msg(rtnl.NLMSG_DONE, struct.pack("=i", 0))
    assert [t for t, _, _ in rtnl.messages(data)] == [16, rtnl.NLMSG_DONE]
    with pytest.raises(rtnl.NetlinkError):
        list(rtnl.messages(struct.pack("=IHHII", 400, 16, 0, 1, 0)))
    with pytest.raises(rtnl.NetlinkError):
        rtnl.attributes(struct.pack("=HH", 2, 1))
    with pytest.raises(rtnl.NetlinkError):
        rtnl.parse_route(rtnl.RTMSG.pack(2, 0, 0, 0, 254, 0, 0, 1, 0)
                         + attr(rtnl.RTA_GATEWAY, b"\1\2\3"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_fuzz_raises_only_its_own_errors(data):
    try:
        for mtype, _, payload in rtnl.messages(data):
            for parse in (rtnl.parse_link, rtnl.parse_addr, rtnl.parse_route):
                with contextlib.suppress(rtnl.NetlinkError, struct.error):
                    parse(payload)
            del mtype
    except rtnl.NetlinkError:
        pass


def test_stdlib_and_pyroute2_agree_on_this_host():
    a = verify._collect()
    b = verify._collect_stdlib()
    for left, right in zip(a, b, strict=True):
        assert sorted(map(repr, left)) == sorted(map(repr, right))
    assert any(link.name == "lo" for link in b[0]) and b[2]


def test_stdlib_backend_rejects_an_open_host_namespace():
    links, addrs, routes = verify._collect_stdlib()
    if not verify.check_state(links, addrs, routes):
        pytest.skip("this host namespace is itself closed: nothing to detect")
    with pytest.raises(NetnsSetupError):
        verify.verify_closed_namespace(backend="stdlib")
    with pytest.raises(ValueError):
        verify.verify_closed_namespace(backend="nope")
