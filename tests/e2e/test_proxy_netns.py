"""The proxy worker across network namespaces, and its restart, as an unprivileged user.

A helper runs in a fresh user+network namespace (only lo), creates the sandbox-side
listener 127.0.0.1:443 there and passes it up by SCM_RIGHTS, exactly as the netns
worker does; the proxy worker runs in the host netns, accepts on that socket and dials
a loopback upstream of the host. The helper then acts as the sandboxed client.
(`unshare -rn` instead of pasta: for the proxy the namespace is what matters.)
"""

from __future__ import annotations

import array
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentpen.core.channel import MsgType, channel_pair
from agentpen.core.policy import SessionPolicy, Upstream
from agentpen.workers.proxy.server import Limits, proxy_main

pytestmark = pytest.mark.e2e
TIMEOUT = 10.0

HELPER = r"""
import array, json, socket, ssl, subprocess, sys
ctl = socket.socket(fileno=int(sys.argv[1]))
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
lst = socket.socket()
lst.bind(("127.0.0.1", 443))
lst.listen(128)
ctl.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [lst.fileno()]))])
lst.close()
f = ctl.makefile("rwb", buffering=0)
for line in f:
    req = json.loads(line)
    out = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=req["sni"])
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    res = {}
    try:
        c = socket.create_connection(("127.0.0.1", 443), timeout=20)
        res["connected"] = True
        if req.get("signal"):
            f.write(b'{"connected": true}\n')  # tell the test we sit in the backlog now
            f.readline()
        c.sendall(out.read() + b"|" + req["payload"].encode())
        c.shutdown(socket.SHUT_WR)
        data = b""
        while d := c.recv(65536):
            data += d
        res["reply"] = data.decode("latin-1")
    except OSError as exc:
        res["error"] = str(exc)
    f.write(json.dumps(res).encode() + b"\n")
"""


class Sandbox:
    """The helper in its own user+net namespace, driven over a unix socketpair."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--net", "--", sys.executable, "-c", HELPER,
             str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        ours.settimeout(TIMEOUT)
        self.ctl = ours
        msg, anc, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
        assert msg == b"L", "helper failed to create the sandbox listener"
        fds = array.array("i")
        fds.frombytes(anc[0][2][:4])
        self.listen_fd = fds[0]
        self.f = ours.makefile("rwb", buffering=0)

    def request(self, sni: str, payload: str, *, signal_backlog: bool = False) -> None:
        self.f.write(json.dumps({"sni": sni, "payload": payload,
                                 "signal": signal_backlog}).encode() + b"\n")

    def reply(self) -> dict[str, Any]:
        return json.loads(self.f.readline())

    def close(self) -> None:
        self.f.close()
        self.ctl.close()
        self.proc.wait(TIMEOUT)
        os.close(self.listen_fd)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare/ip missing")
    sb = Sandbox()
    yield sb
    sb.close()


class Upstream_(threading.Thread):
    """Host-side upstream: replies b'up:' + the payload after the hello (after the last '|')."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while d := conn.recv(65536):
                    data += d
                conn.sendall(b"up:" + data.rsplit(b"|", 1)[-1])


def start_worker(listen_fd: int, upstream_port: int, incarnation: int) -> tuple[Any, Any]:
    sup, wk = channel_pair()
    policy = SessionPolicy(session_id="e2e", profile="untrusted", agent=None, project="/tmp",
                           command=["/bin/true"], command_name="true",
                           allow=["api.example.com"],
                           upstreams=[Upstream("api.example.com", "127.0.0.1", upstream_port)])
    proc = multiprocessing.get_context("fork").Process(
        target=proxy_main, args=(wk.fileno(), [listen_fd], policy.to_json(), incarnation),
        kwargs={"limits": Limits(hello_timeout=5.0), "parent_pid": os.getpid()})
    proc.start()
    wk.close()
    sup.sock.settimeout(TIMEOUT)
    return proc, sup


def serve_acks(sup: Any, stop: threading.Event, seen: list[dict[str, Any]]) -> None:
    while not stop.is_set():
        try:
            msg = sup.recv()
        except (TimeoutError, OSError):
            return
        if msg is None:
            return
        seen.append({"type": msg.type, **msg.body})
        if msg.body.get("ack_id") is not None:
            sup.send(MsgType.ACK, {"ack_id": msg.body["ack_id"], "ok": True})


def wait_ready(sup: Any, seen: list[dict[str, Any]]) -> None:
    while True:
        msg = sup.recv()
        assert msg is not None, "worker died before it was ready"
        seen.append({"type": msg.type, **msg.body})
        if msg.type == MsgType.STATUS and msg.body.get("state") == "ready":
            return


def test_cross_netns_and_restart_without_refusing(sandbox: Sandbox, tmp_path: Path) -> None:
    up = Upstream_()
    up.start()
    seen: list[dict[str, Any]] = []
    proc, sup = start_worker(sandbox.listen_fd, up.port, 1)
    wait_ready(sup, seen)
    stop = threading.Event()
    t = threading.Thread(target=serve_acks, args=(sup, stop, seen), daemon=True)
    t.start()

    # 1. allowed through the sandbox listener to the host upstream; unlisted refused
    sandbox.request("api.example.com", "first-payload")
    assert sandbox.reply()["reply"] == "up:first-payload"
    sandbox.request("evil.example.net", "x")
    assert sandbox.reply().get("reply") == "\x15\x03\x03\x00\x02\x02\x31"  # access_denied

    # 2. kill -9 the worker; a connection made while none runs waits in the backlog
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL
    stop.set()
    sup.close()
    sandbox.request("api.example.com", "during-restart", signal_backlog=True)
    assert sandbox.reply() == {"connected": True}  # the kernel completed the handshake

    # 3. the next incarnation gets the same socket and serves the waiting connection
    t0 = time.monotonic()
    proc2, sup2 = start_worker(sandbox.listen_fd, up.port, 2)
    seen2: list[dict[str, Any]] = []
    wait_ready(sup2, seen2)
    ready_ms = (time.monotonic() - t0) * 1000
    stop2 = threading.Event()
    t2 = threading.Thread(target=serve_acks, args=(sup2, stop2, seen2), daemon=True)
    t2.start()
    sandbox.f.write(b"go\n")
    res = sandbox.reply()
    assert res.get("reply") == "up:during-restart", res
    allowed = [e for e in seen2 if e.get("action") == "connection-allowed"]
    assert allowed and allowed[0]["agentpen"]["connection_id"].startswith("2-")
    (tmp_path / "restart_ms").write_text(f"{ready_ms:.1f}\n")
    print(f"fork to ready (restart, excluding supervisor backoff): {ready_ms:.1f} ms")
    assert ready_ms < 2000

    sup2.send(MsgType.CONTROL, {"op": "shutdown"})
    proc2.join(TIMEOUT)
    assert proc2.exitcode == 0
    stop2.set()
    with contextlib.suppress(OSError):
        sup2.close()
    up.srv.close()
