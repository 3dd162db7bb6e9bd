"""The netns worker's verifier child (workers/netns/main.Verifier) fails closed.

On the host's own namespace (not closed: it has real interfaces and routes) the
child's pyroute2 check must fail and the worker must see the failure; a child that
dies, or a worker that gives up, leaves no process behind."""

from __future__ import annotations

import os
import signal

import pytest
from agentpen.workers.netns import main as netns_main


@pytest.fixture(autouse=True)
def _loaded():
    netns_main._load()


def _host_has_more_than_lo() -> bool:
    return any(name != "lo" for name in os.listdir("/sys/class/net"))


def test_open_namespace_is_reported_as_failure():
    if not _host_has_more_than_lo():
        pytest.fail("this test needs a host namespace with an interface besides lo")
    v = netns_main.Verifier.start()
    v.dump()
    with pytest.raises(netns_main._Fatal, match="not closed"):
        v.result()
    v.abandon()
    assert v.reaped
    with pytest.raises(ChildProcessError):
        os.waitpid(v.pid, os.WNOHANG)


def test_dead_child_fails_closed():
    v = netns_main.Verifier.start()
    os.kill(v.pid, signal.SIGKILL)
    v.dump()
    with pytest.raises(netns_main._Fatal, match="died"):
        v.result()
    v.abandon()


def test_abandon_without_dump_reaps_the_child():
    v = netns_main.Verifier.start()
    v.abandon()
    assert v.reaped and v.go_w == -1 and v.res_r == -1
    with pytest.raises(ChildProcessError):
        os.waitpid(v.pid, os.WNOHANG)
