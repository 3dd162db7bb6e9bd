"""Proxy listeners (real sockets on loopback) and the capability proof."""

from __future__ import annotations

import json
import os
import socket

import pytest
from agentpen.core.osutil import capability_sets
from agentpen.workers.netns.caps import assert_no_capabilities, drop_and_prove
from agentpen.workers.netns.errors import NetnsSetupError
from agentpen.workers.netns.listeners import create_proxy_listeners


def test_listeners_on_both_loopbacks_v6only():
    socks = create_proxy_listeners(port=0, backlog=8)
    try:
        assert [s.family for s in socks] == [socket.AF_INET, socket.AF_INET6]
        assert socks[0].getsockname()[0] == "127.0.0.1"
        assert socks[1].getsockname()[0] == "::1"
        assert socks[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        for s in socks:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert s.getblocking() is False
            assert not os.get_inheritable(s.fileno())  # only SCM_RIGHTS hands them on
            with socket.create_connection(s.getsockname()[:2], timeout=5):
                pass
    finally:
        for s in socks:
            s.close()


def test_listeners_all_or_nothing():
    taken = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    taken.bind(("::1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    before = set(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(NetnsSetupError) as exc:
            create_proxy_listeners(port=port)
        assert "::1" in exc.value.what
    finally:
        taken.close()
    # the 127.0.0.1 socket made before the failure was closed, not leaked
    assert set(os.listdir("/proc/self/fd")) <= before


def test_assert_no_capabilities_sees_held_caps():
    if not capability_sets()["CapEff"]:
        pytest.skip("this test process holds no capability: nothing to detect")
    with pytest.raises(NetnsSetupError):
        assert_no_capabilities()


CAP_SETPCAP = 8


def test_drop_and_prove_in_a_child():
    if not capability_sets()["CapEff"] & (1 << CAP_SETPCAP):
        pytest.skip("dropping the bounding set needs CAP_SETPCAP (root, or userns root: e2e)")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the drop is for good: do it in a throwaway child
        try:
            os.close(r)
            result = {"ok": drop_and_prove()}
        except BaseException as exc:
            result = {"error": repr(exc)}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    assert "ok" in result, result
    assert set(result["ok"]) == {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}
    assert all(v == "0" * 16 for v in result["ok"].values())
