"""Integration tests of the proxy worker in the host netns: the real proxy_main forked
the way the supervisor forks it (confined), a fake supervisor end on the channel,
a loopback listening socket, raw and TLS upstreams on loopback pinned with Upstream."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agentpen.core.channel import Channel, Message, MsgType, channel_pair
from agentpen.core.policy import SessionPolicy, Upstream
from agentpen.workers.proxy.server import Limits, proxy_main
from test_proxy_clienthello import build_hello, python_ssl_hello

TIMEOUT = 10.0
ALERT_ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"


# -- fake supervisor --------------------------------------------------------------------


class FakeSupervisor(threading.Thread):
    """Reads the worker's messages, ACKs decisions (ok / refused / held)."""

    def __init__(self, chan: Channel) -> None:
        super().__init__(daemon=True)
        self.chan = chan
        self.msgs: list[Message] = []
        self.cond = threading.Condition()
        self.ack_ok = True
        self.hold = False
        self.held: list[int] = []
        self.eof = False

    def run(self) -> None:
        while True:
            try:
                msg = self.chan.recv()
            except OSError:
                msg = None
            with self.cond:
                if msg is None:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.msgs.append(msg)
                ack_id = msg.body.get("ack_id")
                if ack_id is not None:
                    if self.hold:
                        self.held.append(ack_id)
                    else:
                        self.chan.send(MsgType.ACK, {"ack_id": ack_id, "ok": self.ack_ok})
                self.cond.notify_all()

    def release(self) -> None:
        with self.cond:
            self.hold = False
            for ack_id in self.held:
                self.chan.send(MsgType.ACK, {"ack_id": ack_id, "ok": self.ack_ok})
            self.held.clear()

    def wait_for(self, pred: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
        with self.cond:
            res = self.cond.wait_for(pred, timeout)
        assert res, f"timed out; messages so far: {[m.body for m in self.msgs]}"
        return res

    def events(self, action: str) -> list[dict[str, Any]]:
        return [m.body for m in self.msgs if m.type == MsgType.EVENT and m.body["action"] == action]

    def wait_event(self, action: str, n: int = 1) -> list[dict[str, Any]]:
        return self.wait_for(lambda: len(self.events(action)) >= n and self.events(action))

    def status(self, key: str) -> dict[str, Any]:
        return self.wait_for(lambda: next(
            (m.body for m in self.msgs if m.type == MsgType.STATUS and key in m.body), None))


# -- upstreams ------------------------------------------------------------------------------


class RawUpstream(threading.Thread):
    """A TCP server on loopback that runs `handler(conn)` per connection and counts them."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen()
        self.port = self.srv.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(TIMEOUT)
            try:
                self.handler(conn)
            except BaseException as exc:  # surfaced by the test
                self.errors.append(exc)
            finally:
                conn.close()
                self.done.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        d = sock.recv(1 << 16)
        if not d:
            return b"".join(chunks)
        chunks.append(d)


# -- the worker ------------------------------------------------------------------------------


@dataclass
class Worker:
    sup: FakeSupervisor
    port: int
    proc: Any
    resolved: list[str] = field(default_factory=list)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


def make_policy(allow: list[str], upstreams: list[Upstream] | None = None,
                learn: bool = False) -> dict[str, Any]:
    return SessionPolicy(session_id="t", profile="untrusted", agent=None, project="/tmp",
                         command=["/bin/true"], command_name="true", allow=allow,
                         upstreams=upstreams or [], learn=learn).to_json()


FAKE_DNS: dict[str, list[str]] = {"private.example.com": ["127.0.0.1"],
                                  "mixed.example.com": ["10.1.1.1", "::1", "192.168.0.9"]}


async def fake_resolver(host: str, port: int, type: int = 0) -> list[Any]:
    if host not in FAKE_DNS:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, type, 6, "", (ip, port))
            for ip in FAKE_DNS[host]]


@contextlib.contextmanager
def running_worker(policy: dict[str, Any], **limits: Any) -> Iterator[Worker]:
    sup_end, wk_end = channel_pair()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    ctx = multiprocessing.get_context("fork")
    lim = Limits(**{"hello_timeout": 2.0, "ack_timeout": 3.0, "connect_timeout": 3.0,
                    "resolve_timeout": 3.0, **limits})
    proc = ctx.Process(target=proxy_main,
                       args=(wk_end.fileno(), [lsock.fileno()], policy, 7),
                       kwargs={"limits": lim, "parent_pid": os.getpid(),
                               "resolver": fake_resolver, "debug_ops": True})
    proc.start()
    wk_end.close()
    sup = FakeSupervisor(sup_end)
    sup.start()
    w = Worker(sup, lsock.getsockname()[1], proc)
    try:
        sup.status("state")
        assert sup.status("state")["state"] == "ready"
        yield w
    finally:
        with contextlib.suppress(OSError):
            sup_end.send(MsgType.CONTROL, {"op": "shutdown"})
        proc.join(TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(TIMEOUT)
        sup_end.close()
        lsock.close()


def pinned(port: int, host: str = "api.example.com") -> list[Upstream]:
    return [Upstream(host, "127.0.0.1", port)]


# -- tests ---------------------------------------------------------------------------------------


def test_allowed_bytes_verbatim_both_ways_with_half_close() -> None:
    hello = python_ssl_hello("api.example.com")
    up_payload = os.urandom(3 * 1024 * 1024 + 17)
    down_payload = os.urandom(2 * 1024 * 1024 + 5)
    got: dict[str, bytes] = {}

    def handler(conn: socket.socket) -> None:
        got["up"] = recv_all(conn)  # until the client's FIN, passed on by the proxy
        conn.sendall(down_payload)  # still possible: only one direction is closed
        conn.shutdown(socket.SHUT_WR)

    up = RawUpstream(handler)
    up.start()
    with running_worker(make_policy(["*.example.com"], pinned(up.port))) as w:
        # Hold the ACK: nothing may reach the upstream before the decision is recorded.
        w.sup.hold = True
        c = w.connect()
        c.sendall(hello)
        w.sup.wait_for(lambda: w.sup.held)
        r, _, _ = select.select([up.srv], [], [], 0.3)
        assert not r and up.accepted == 0, "upstream reached before the ACK"
        w.sup.release()
        c.sendall(up_payload)
        c.shutdown(socket.SHUT_WR)
        received = recv_all(c)
        c.close()
        assert up.done.wait(TIMEOUT) and not up.errors
        assert got["up"] == hello + up_payload
        assert received == down_payload
        start = w.sup.wait_event("connection-allowed")[0]
        assert start["event"]["type"] == ["connection", "allowed", "start"]
        assert start["rule"] == {"name": "*.example.com"}
        assert start["tls"]["client"]["server_name"] == "api.example.com"
        assert start["agentpen"]["upstream_pinned"] is True
        end = w.sup.wait_event("connection-closed")[0]
        assert end["event"]["outcome"] == "success"
        assert end["source"]["bytes"] == len(hello) + len(up_payload)
        assert end["destination"]["bytes"] == len(down_payload)
        assert end["destination"]["ip"] == "127.0.0.1" and end["event"]["duration"] > 0
    up.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=api.example.com",
                    "-addext", "subjectAltName=DNS:api.example.com"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def test_real_tls_passthrough_no_mitm(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(cert, key)

    def handler(conn: socket.socket) -> None:
        with sctx.wrap_socket(conn, server_side=True) as t:
            while data := t.recv(65536):
                t.sendall(data[::-1])

    up = RawUpstream(handler)
    up.start()
    with running_worker(make_policy(["api.example.com"], pinned(up.port))) as w:
        cctx = ssl.create_default_context(cafile=str(cert))  # verifies the upstream's own cert
        with cctx.wrap_socket(w.connect(), server_hostname="api.example.com") as t:
            t.sendall(b"hello upstream")
            assert t.recv(100) == b"maertspu olleh"
            assert t.getpeercert()["subject"] == ((("commonName", "api.example.com"),),)
        end = w.sup.wait_event("connection-closed")[0]
        assert end["event"]["outcome"] == "success"
    up.close()


def _blocked(w: Worker, data: bytes | list[bytes]) -> bytes:
    c = w.connect()
    for chunk in data if isinstance(data, list) else [data]:
        with contextlib.suppress(OSError):
            c.sendall(chunk)
    try:
        return recv_all(c)
    except ConnectionResetError:
        return b"<reset>"
    finally:
        c.close()


def test_unlisted_name_blocked_before_any_byte() -> None:
    up = RawUpstream(lambda conn: None)
    up.start()
    policy = make_policy(["api.example.com"], pinned(up.port) + pinned(up.port, "evil.example.net"))
    with running_worker(policy) as w:
        assert _blocked(w, python_ssl_hello("evil.example.net")) == ALERT_ACCESS_DENIED
        ev = w.sup.wait_event("connection-denied")[0]
        assert ev["event"]["type"] == ["connection", "denied"]
        assert ev["event"]["outcome"] == "success"
        assert "not in the allowlist" in ev["event"]["reason"]
        assert ev["destination"]["domain"] == "evil.example.net"
        assert up.accepted == 0 and not w.sup.events("connection-allowed")
        # positive control: the listed name, same pin, reaches the same upstream
        c = w.connect()
        c.sendall(python_ssl_hello("api.example.com"))
        assert up.done.wait(TIMEOUT) and up.accepted == 1
        c.close()
    up.close()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (python_ssl_hello(None), "no SNI"),
        (b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n", "malformed ClientHello"),
        (build_hello(b"api.example.com\x00.evil.net"), "malformed ClientHello"),
    ],
)
def test_blocked_hellos(data: bytes, reason: str) -> None:
    with running_worker(make_policy(["api.example.com"], learn=True)) as w:
        _blocked(w, data)
        ev = w.sup.wait_event("connection-denied")[0]
        assert reason in ev["event"]["reason"]
        assert w.sup.events("connection-allowed") == []


def test_hello_trickled_byte_by_byte() -> None:
    hello = python_ssl_hello("api.example.com")
    got: dict[str, bytes] = {}
    up = RawUpstream(lambda conn: got.setdefault("up", recv_all(conn)))
    up.start()
    with running_worker(make_policy(["api.example.com"], pinned(up.port))) as w:
        c = w.connect()
        for i in range(len(hello)):
            c.send(hello[i : i + 1])
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b""
        assert up.done.wait(TIMEOUT) and got["up"] == hello
    up.close()


def test_incomplete_hello_closed_after_timeout() -> None:
    hello = python_ssl_hello("api.example.com")
    with running_worker(make_policy(["api.example.com"]), hello_timeout=0.5) as w:
        c = w.connect()
        c.sendall(hello[:-1])
        t0 = time.monotonic()
        assert recv_all(c) == b""  # closed by the proxy, not by us
        assert 0.4 < time.monotonic() - t0 < 5
        ev = w.sup.wait_event("connection-denied")[0]
        assert ev["event"]["code"] == "hello-timeout"


def test_ack_refused_closes_without_dialling() -> None:
    up = RawUpstream(lambda conn: None)
    up.start()
    with running_worker(make_policy(["api.example.com"], pinned(up.port))) as w:
        w.sup.ack_ok = False
        assert _blocked(w, python_ssl_hello("api.example.com")) == b""
        assert w.sup.wait_event("connection-allowed")
        assert up.accepted == 0
        w.sup.ack_ok = True  # positive control: the same connection with ok=True is dialled
        c = w.connect()
        c.sendall(python_ssl_hello("api.example.com"))
        assert up.done.wait(TIMEOUT) and up.accepted == 1
        c.close()
    up.close()


def test_private_resolution_refused_unless_pinned() -> None:
    up = RawUpstream(lambda conn: None)
    up.start()
    # private.example.com resolves (fake resolver) to 127.0.0.1, where `up` listens on
    # the port the worker dials for unpinned names.
    with running_worker(make_policy(["*.example.com"]), upstream_port=up.port) as w:
        assert _blocked(w, python_ssl_hello("private.example.com")) == b""
        end = w.sup.wait_event("connection-closed")[0]
        assert end["event"]["outcome"] == "failure"
        assert "127.0.0.1 (loopback)" in end["error"]["message"]
        _blocked(w, python_ssl_hello("mixed.example.com"))
        end = w.sup.wait_event("connection-closed", 2)[1]
        assert "10.1.1.1 (private" in end["error"]["message"]
        assert "::1 (loopback)" in end["error"]["message"]
        assert up.accepted == 0
    policy = make_policy(["*.example.com"], pinned(up.port, "private.example.com"))
    with running_worker(policy) as w:  # positive control: pinned, the same address is reached
        c = w.connect()
        c.sendall(python_ssl_hello("private.example.com"))
        assert up.done.wait(TIMEOUT) and up.accepted == 1
        c.close()
        end = w.sup.wait_event("connection-closed")[0]
        assert end["agentpen"]["upstream_pinned"] is True
    up.close()


def test_upstream_unreachable_audited() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens here now: connection refused
    with running_worker(make_policy(["api.example.com"], pinned(port))) as w:
        assert _blocked(w, python_ssl_hello("api.example.com")) == b""
        end = w.sup.wait_event("connection-closed")[0]
        assert end["event"]["outcome"] == "failure"
        assert f"127.0.0.1:{port}" in end["error"]["message"]


def _blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback port whose SYNs are dropped: a listener with a full accept queue."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(srv.getsockname())
        fillers.append(f)
    return srv, fillers


def test_upstream_connect_timeout_audited() -> None:
    srv, fillers = _blackhole()
    port = srv.getsockname()[1]
    probe = socket.socket()
    probe.settimeout(0.3)
    with pytest.raises(TimeoutError):  # control: a plain connect there hangs
        probe.connect(("127.0.0.1", port))
    probe.close()
    with running_worker(make_policy(["api.example.com"], pinned(port)), connect_timeout=0.5) as w:
        t0 = time.monotonic()
        assert _blocked(w, python_ssl_hello("api.example.com")) == b""
        assert 0.4 < time.monotonic() - t0 < 5
        end = w.sup.wait_event("connection-closed")[0]
        assert end["event"]["outcome"] == "failure"
        assert end["error"]["message"] == f"127.0.0.1:{port}: connect timeout", end["error"]
    for sock in [srv, *fillers]:
        sock.close()


def test_shutdown_during_connect_is_not_a_timeout() -> None:
    """A shutdown aborts a connection while the proxy dials: its summary says so (the
    task's own cancellation is not mistaken for the connect bound, nor eaten)."""
    srv, fillers = _blackhole()
    with running_worker(make_policy(["api.example.com"], pinned(srv.getsockname()[1])),
                        connect_timeout=30) as w:
        c = w.connect()
        c.sendall(python_ssl_hello("api.example.com"))
        w.sup.wait_event("connection-allowed")
        t0 = time.monotonic()
        w.sup.chan.send(MsgType.CONTROL, {"op": "shutdown"})
        end = w.sup.wait_event("connection-closed")[0]
        assert time.monotonic() - t0 < 5
        assert end["agentpen"]["close_reason"] == "worker shutdown", end
        assert "connect timeout" not in str(end), end
        c.close()
    for sock in [srv, *fillers]:
        sock.close()


def test_connection_cap_audited() -> None:
    with running_worker(make_policy(["api.example.com"]), max_connections=2) as w:
        held = [w.connect(), w.connect()]
        for c in held:
            c.sendall(b"\x16")  # start a hello, keep the slot busy
        assert _blocked(w, python_ssl_hello("api.example.com")) in (b"", b"<reset>")
        ev = w.sup.wait_event("connection-denied")[0]
        assert ev["event"]["code"] == "connection-cap"
        for c in held:
            c.close()


def test_deny_new_and_allow_new() -> None:
    up = RawUpstream(lambda conn: None)
    up.start()
    with running_worker(make_policy(["api.example.com"], pinned(up.port))) as w:
        w.sup.chan.send(MsgType.CONTROL, {"op": "deny-new"})
        w.sup.wait_for(lambda: any(m.body.get("control") == "deny-new" for m in w.sup.msgs))
        # closed unread: FIN or RST depending on whether the hello arrived first
        assert _blocked(w, python_ssl_hello("api.example.com")) in (b"", b"<reset>")
        w.sup.chan.send(MsgType.CONTROL, {"op": "allow-new"})
        ev = w.sup.wait_event("connections-refused")[0]
        assert ev["agentpen"]["count"] >= 1
        assert up.accepted == 0
        c = w.connect()  # positive control after allow-new
        c.sendall(python_ssl_hello("api.example.com"))
        assert up.done.wait(TIMEOUT) and up.accepted == 1
        c.close()
    up.close()


def test_idle_timeout() -> None:
    up = RawUpstream(lambda conn: conn.recv(1 << 20) and conn.recv(1))
    up.start()
    with running_worker(make_policy(["api.example.com"], pinned(up.port)), idle_timeout=0.5) as w:
        c = w.connect()
        c.sendall(python_ssl_hello("api.example.com"))
        assert recv_all(c) == b""
        end = w.sup.wait_event("connection-closed")[0]
        assert "idle" in end["agentpen"]["close_reason"]
    up.close()


def test_worker_cannot_exec() -> None:
    with running_worker(make_policy(["api.example.com"])) as w:
        w.sup.chan.send(MsgType.CONTROL, {"op": "probe-exec"})
        assert w.sup.status("probe")["exec_errno"] == errno.EPERM
    # positive control: the same probe in an unconfined child does exec /bin/true
    pid = os.fork()
    if pid == 0:
        from agentpen.workers.proxy.server import _probe_exec
        _probe_exec()
        os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_worker_exits_when_channel_closes() -> None:
    with running_worker(make_policy(["api.example.com"])) as w:
        w.sup.chan.sock.shutdown(socket.SHUT_RDWR)
        w.proc.join(TIMEOUT)
        assert w.proc.exitcode == 0


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_backpressure_bounds_memory_and_download_completes() -> None:
    total = 160 * 1024 * 1024
    state = {"sent": 0, "at_block": 0}
    blocked = threading.Event()
    hello = python_ssl_hello("api.example.com")

    def handler(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        got = b""
        while len(got) < len(hello):
            got += conn.recv(65536)
        chunk = bytes(1 << 16)
        conn.settimeout(1.0)  # a send that waits this long means the proxy stopped reading
        while state["sent"] < total:
            try:
                state["sent"] += conn.send(chunk[: total - state["sent"]])
            except TimeoutError:
                if not blocked.is_set():
                    state["at_block"] = state["sent"]
                    blocked.set()
                conn.settimeout(TIMEOUT)
        conn.shutdown(socket.SHUT_WR)

    up = RawUpstream(handler)
    up.start()
    with running_worker(make_policy(["api.example.com"], pinned(up.port))) as w:
        rss0 = _rss_kib(w.proc.pid)
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.settimeout(TIMEOUT)
        c.connect(("127.0.0.1", w.port))
        c.sendall(hello)
        assert blocked.wait(TIMEOUT * 3), "upstream never blocked: the proxy buffers without bound"
        growth = _rss_kib(w.proc.pid) - rss0
        received = 0
        while d := c.recv(1 << 20):
            received += len(d)
        c.close()
        assert received == total  # no stall after the pause
        assert state["at_block"] < total // 2
        assert growth < 16 * 1024, f"proxy RSS grew {growth} KiB while the client was stalled"
    up.close()


def test_backpressure_toward_a_stalled_upstream_upload_completes() -> None:
    """The other direction: the upstream stops reading; the proxy stops reading the
    client (its sends block), holds at most a chunk, and resumes once the upstream
    drains (the upstream socket's EPOLLOUT is re-armed only then). Bytes verbatim."""
    import hashlib

    total = 48 * 1024 * 1024 + 3
    hello = python_ssl_hello("api.example.com")
    payload = os.urandom(1 << 20)
    got: dict[str, Any] = {}
    stalled = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        stalled.wait(TIMEOUT * 3)  # read nothing until the client is stuck
        h, n = hashlib.sha256(), 0
        while d := conn.recv(1 << 20):
            h.update(d)
            n += len(d)
        got["n"], got["sha"] = n, h.hexdigest()
        conn.sendall(b"done")

    up = RawUpstream(handler)
    up.start()
    want = hashlib.sha256(hello)
    with running_worker(make_policy(["api.example.com"], pinned(up.port))) as w:
        rss0 = _rss_kib(w.proc.pid)
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        c.connect(("127.0.0.1", w.port))
        c.sendall(hello)
        c.settimeout(1.0)
        sent = 0
        while sent < total:
            chunk = payload[: min(len(payload), total - sent)]
            try:
                n = c.send(chunk)
            except TimeoutError:  # the proxy stopped reading us: the stall reached us
                if not stalled.is_set():
                    growth = _rss_kib(w.proc.pid) - rss0
                    assert sent < total // 2, "the proxy read everything while upstream stalled"
                    assert growth < 16 * 1024, f"proxy RSS grew {growth} KiB"
                    stalled.set()
                    c.settimeout(TIMEOUT)
                continue
            want.update(chunk[:n])
            sent += n
        c.shutdown(socket.SHUT_WR)
        c.settimeout(TIMEOUT)
        assert recv_all(c) == b"done"
        c.close()
        assert stalled.is_set()
        assert up.done.wait(TIMEOUT) and not up.errors
        assert got == {"n": total + len(hello), "sha": want.hexdigest()}
        end = w.sup.wait_event("connection-closed")[0]
        assert end["source"]["bytes"] == total + len(hello)
    up.close()


def test_learn_mode_allows_and_marks_would_block() -> None:
    up = RawUpstream(lambda conn: conn.recv(65536))
    up.start()
    policy = make_policy(["api.example.com"], pinned(up.port, "other.example.org"), learn=True)
    with running_worker(policy) as w:
        c = w.connect()
        c.sendall(python_ssl_hello("other.example.org"))
        assert up.done.wait(TIMEOUT) and up.accepted == 1
        c.close()
        ev = w.sup.wait_event("connection-allowed")[0]
        assert ev["agentpen"]["would_block"] is True and "rule" not in ev
        assert ev["event"]["reason"] == "learn mode"


def test_shutdown_sends_summaries_of_open_connections() -> None:
    up = RawUpstream(lambda conn: conn.recv(1 << 20) and conn.recv(1))
    up.start()
    with running_worker(make_policy(["api.example.com"], pinned(up.port))) as w:
        c = w.connect()
        c.sendall(python_ssl_hello("api.example.com"))
        w.sup.wait_event("connection-allowed")
        up_seen = up.accepted
        w.sup.chan.send(MsgType.CONTROL, {"op": "shutdown"})
        end = w.sup.wait_event("connection-closed")[0]
        assert end["agentpen"]["close_reason"] == "worker shutdown" and up_seen <= 1
        w.proc.join(TIMEOUT)
        assert w.proc.exitcode == 0
        c.close()
    up.close()


def test_bad_policy_fails_closed_with_status() -> None:
    sup_end, wk_end = channel_pair()
    lsock = socket.create_server(("127.0.0.1", 0))
    proc = multiprocessing.get_context("fork").Process(
        target=proxy_main, args=(wk_end.fileno(), [lsock.fileno()],
                                 make_policy(["localhost"]), 1))
    proc.start()
    wk_end.close()
    sup_end.sock.settimeout(TIMEOUT)
    msg = sup_end.recv()
    assert msg is not None and msg.body["state"] == "failed"
    assert "local-only" in msg.body["error"]
    proc.join(TIMEOUT)
    assert proc.exitcode == 2
    sup_end.close()
    lsock.close()


def test_not_a_listening_socket_fails_closed() -> None:
    sup_end, wk_end = channel_pair()
    plain = socket.socket()
    proc = multiprocessing.get_context("fork").Process(
        target=proxy_main, args=(wk_end.fileno(), [plain.fileno()],
                                 make_policy(["api.example.com"]), 1))
    proc.start()
    wk_end.close()
    sup_end.sock.settimeout(TIMEOUT)
    msg = sup_end.recv()
    assert msg is not None and "not a listening socket" in msg.body["error"]
    proc.join(TIMEOUT)
    assert proc.exitcode == 2
    sup_end.close()
    plain.close()


def test_max_lifetime() -> None:
    up = RawUpstream(lambda conn: [conn.recv(65536) for _ in range(100)])
    up.start()
    policy = make_policy(["api.example.com"], pinned(up.port))
    with running_worker(policy, max_lifetime=0.6, idle_timeout=30) as w:
        c = w.connect()
        c.sendall(python_ssl_hello("api.example.com"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < TIMEOUT:  # keep it busy: idle never triggers
            try:
                c.sendall(b"x")
            except OSError:
                break
            r, _, _ = select.select([c], [], [], 0.05)
            if r and c.recv(100) == b"":
                break
        end = w.sup.wait_event("connection-closed")[0]
        assert "max lifetime" in end["agentpen"]["close_reason"]
        c.close()
    up.close()


def test_accepted_sockets_inherit_nodelay() -> None:
    """The proxy sets TCP_NODELAY once, on the listener, and relies on Linux copying it
    to every accepted socket (the dialled one gets its own setsockopt)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = socket.create_connection(lsock.getsockname(), timeout=TIMEOUT)
    conn, _ = lsock.accept()
    try:
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for s in (conn, c, lsock):
            s.close()


def test_events_validate_against_the_audit_schema() -> None:
    """Contract with the supervisor: every event the worker sends becomes an audit line
    that validates against supervisor/audit-schema.json with nothing rejected."""
    import json

    import jsonschema
    from agentpen.supervisor.audit.ecs import build_record

    schema_path = Path(__file__).resolve().parents[2] / "supervisor" / "audit-schema.json"
    schema = json.loads(schema_path.read_text())
    up = RawUpstream(lambda conn: conn.recv(65536))
    up.start()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    policy = make_policy(["api.example.com", "down.example.com", "*.example.com"],
                         pinned(up.port) + pinned(dead_port, "down.example.com"))
    with running_worker(policy, hello_timeout=0.3, max_connections=3) as w:
        c = w.connect()
        c.sendall(python_ssl_hello("api.example.com"))
        assert up.done.wait(TIMEOUT)
        c.close()
        _blocked(w, python_ssl_hello("evil.example.net"))
        _blocked(w, python_ssl_hello(None))
        _blocked(w, python_ssl_hello("down.example.com"))
        _blocked(w, python_ssl_hello("private.example.com"))
        _blocked(w, b"\x16\x03\x01")  # hello timeout
        _blocked(w, b"junk")
        w.sup.wait_event("connection-closed", 3)
        w.sup.wait_event("connection-denied", 4)
        bodies = [dict(m.body) for m in w.sup.msgs if m.type == MsgType.EVENT]
    up.close()
    assert len(bodies) >= 9
    for i, body in enumerate(bodies, 1):
        body.pop("ack_id", None)  # the supervisor consumes it before building the record
        rec = build_record(body, session_id="t", sequence=i, sender="proxy", pid=1)
        line = json.loads(json.dumps(rec))
        jsonschema.validate(line, schema)
        assert "rejected" not in line.get("agentpen", {}), line


def test_no_ack_times_out_and_closes() -> None:
    up = RawUpstream(lambda conn: None)
    up.start()
    with running_worker(make_policy(["api.example.com"], pinned(up.port)), ack_timeout=0.5) as w:
        w.sup.hold = True  # the supervisor never answers (stuck audit sink)
        t0 = time.monotonic()
        assert _blocked(w, python_ssl_hello("api.example.com")) == b""
        assert 0.4 < time.monotonic() - t0 < 5
        assert up.accepted == 0
    up.close()


def test_channel_encoding_is_json_dumps() -> None:
    """The worker's events go through channel.encode()'s reused C encoder: the same bytes
    as json.dumps() with the channel's options, for every kind of value."""
    import json

    from agentpen.core.channel import encode

    body = {"action": "x", "s": "ünï\u0000code\u2028\"\\\n", "n": [0, -5, 2**70, 1.5, None, True],
            "nested": {"a": {"b": [], "c": {}}, "inf": float("inf")}}
    packet, _, _ = encode(MsgType.EVENT, body)
    assert packet[4:] == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    with pytest.raises(TypeError):
        encode(MsgType.EVENT, {"a": object()})


def test_connection_events_match_make_event() -> None:
    """The per-connection events are built as literals; they must be exactly what
    make_event() (the shape every other event has) gives for the same fields, key
    order included, in every variant."""
    import itertools
    import json
    from types import SimpleNamespace

    from agentpen.core.events import make_event
    from agentpen.workers.proxy.clienthello import ClientHello
    from agentpen.workers.proxy.server import Connection, _Side

    def fields(c: Any) -> dict[str, Any]:  # the worker's _fields(), as it was
        h = c.hello
        name = h.server_name if h else None
        f: dict[str, Any] = {"source": c.source or None,
                             "destination": {"port": c.proxy.limits.upstream_port},
                             "agentpen": {"connection_id": c.cid, "incarnation": c.proxy.incarnation}}
        if name:
            f["destination"]["domain"] = name
        if h is not None:
            f["tls"] = {"client": {"server_name": name}} if name else None
            f["agentpen"]["ech"] = h.ech
            if h.alpn:
                f["agentpen"]["alpn"] = list(h.alpn)
        if c.rule:
            f["rule"] = {"name": c.rule}
        return f

    def allowed_ref(c: Any, name: str, pin: Any, would_block: bool) -> dict[str, Any]:
        f = fields(c)
        f["agentpen"].update(upstream_pinned=pin is not None, would_block=would_block)
        if pin is not None:
            f["destination"].update(ip=pin.addr, port=pin.port)
        msg = (f"would block {name} (learn mode): allowed" if would_block
               else f"allowed {name} by {c.rule}")
        return make_event("connection-allowed", msg, level="warning" if would_block else "info",
                          category=["network"], type=["connection", "allowed", "start"],
                          outcome="success", reason="learn mode" if would_block else None, **f)

    def closed_ref(c: Any, duration: int) -> dict[str, Any]:
        f = fields(c)
        f["source"] = {**(c.source or {}), "bytes": c.c.nbytes}
        f["destination"]["bytes"] = c.u.nbytes
        if c.up_ip:
            f["destination"].update(ip=c.up_ip, port=c.up_port)
        f["agentpen"]["upstream_pinned"] = c.pinned
        f["agentpen"]["close_reason"] = c.close_reason
        failed = c.up_ip is None
        name = c.hello.server_name if c.hello else None
        return make_event(
            "connection-closed",
            f"{name}: {'upstream error: ' + c.error if c.error else c.close_reason}",
            level="error" if failed else "info", category=["network"],
            type=["connection", "end"], outcome="failure" if failed else "success",
            event={"duration": duration}, error={"message": c.error} if c.error else None, **f)

    proxy = SimpleNamespace(incarnation=3, limits=Limits())
    pin = Upstream("api.example.com", "127.0.0.2", 8443)
    n = 0
    for alpn, ech, source, learn, pinned, up_ip, error in itertools.product(
            [(), ("h2", 'x"\\y')], [False, True], [{}, {"ip": "10.0.0.2", "port": 4711}],
            [False, True], [False, True], [None, "127.0.0.2"], [None, "boom"]):
        c = Connection.__new__(Connection)
        c.proxy = proxy  # type: ignore[assignment]
        c.cid = "3-7"
        c.hello = ClientHello(server_name="api.example.com", ech=ech, alpn=alpn, legacy_version=0x303,
                              handshake_length=100, records=1, consumed=105)
        c.rule = None if learn else "*.example.com"
        c.source = source
        c.pinned = pinned
        c.c, c.u = _Side(), _Side()
        c.c.nbytes, c.u.nbytes = 517, 4242
        c.up_ip, c.up_port = up_ip, 8443 if up_ip else 0
        c.error = error
        c.close_reason = "both sides closed"
        c.t0 = time.monotonic_ns()
        got = c._allowed_event("api.example.com", pin if pinned else None, learn)
        want = allowed_ref(c, "api.example.com", pin if pinned else None, learn)
        assert json.dumps(got) == json.dumps(want)
        got = c._closed_event()
        want = closed_ref(c, got["event"]["duration"])
        assert json.dumps(got) == json.dumps(want)
        n += 1
    assert n == 128
