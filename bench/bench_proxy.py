"""Proxy worker benchmark, with direct and HAProxy anchors measured in the same run.

    /opt/apvenv/bin/python bench/bench_proxy.py [--quick]

Loopback, host netns (the proxy's data path is the same as in the sandbox: accept on
a listening socket it was handed, dial from the host). Upstream: a uvloop process with
a TLS port (answers one HTTP request), a bulk port and an idle port (raw bytes after
the ClientHello). The proxy runs as the supervisor runs it (forked proxy_main,
confined) with an ACKing fake supervisor in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from agentpen.core.channel import Channel, MsgType, channel_pair
from agentpen.core.policy import SessionPolicy, Upstream
from agentpen.workers.proxy.clienthello import ClientHelloParser
from agentpen.workers.proxy.server import Limits, proxy_main

BULK = 1 << 30
CLK = os.sysconf("SC_CLK_TCK")


# -- upstream ------------------------------------------------------------------------------


class _Hello(asyncio.Protocol):
    """Skips the ClientHello, then acts by port kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.parser: ClientHelloParser | None = ClientHelloParser()
        self.left = BULK
        self.paused = False

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        if self.parser is None or self.parser.feed(data) is None:
            return
        self.parser = None
        if self.kind == "idle":
            self.t.write(b"k")
        else:
            self.chunk = bytes(1 << 20)
            self._pump()

    def _pump(self) -> None:
        while self.left > 0 and not self.paused:
            n = min(self.left, len(self.chunk))
            self.t.write(self.chunk[:n])
            self.left -= n
        if self.left == 0:
            self.t.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()


class _Http(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.t.close()


def upstream_main(socks: dict[str, socket.socket], cert: str, key: str) -> None:
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(cert, key)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_Http, sock=socks["tls"], ssl=sctx, backlog=4096)
        await loop.create_server(lambda: _Hello("bulk"), sock=socks["bulk"], backlog=4096)
        await loop.create_server(lambda: _Hello("idle"), sock=socks["idle"], backlog=4096)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- proxy under test ----------------------------------------------------------------------


def acker_main(chan: Channel) -> None:
    while (msg := chan.recv()) is not None:
        if msg.body.get("ack_id") is not None:
            chan.send(MsgType.ACK, {"ack_id": msg.body["ack_id"], "ok": True})


class Proxy:
    def __init__(self, lsock: socket.socket, ports: dict[str, int]) -> None:
        self.lsock = lsock
        self.policy = SessionPolicy(
            session_id="bench", profile="untrusted", agent=None, project="/tmp",
            command=["/bin/true"], command_name="true",
            allow=["api.example.com", "bulk.example.com", "idle.example.com"],
            upstreams=[Upstream(f"{k}.example.com" if k != "tls" else "api.example.com",
                                "127.0.0.1", p) for k, p in ports.items()]).to_json()
        self.ctx = multiprocessing.get_context("fork")
        self.incarnation = 0

    def start(self) -> float:
        """Fork a worker; returns seconds from fork to STATUS ready."""
        self.incarnation += 1
        sup, wk = channel_pair()
        t0 = time.perf_counter()
        self.proc = self.ctx.Process(target=proxy_main, args=(
            wk.fileno(), [self.lsock.fileno()], self.policy, self.incarnation),
            kwargs={"limits": Limits(max_connections=4096)})
        self.proc.start()
        wk.close()
        while True:
            msg = sup.recv()
            assert msg is not None, "proxy worker died at start"
            if msg.type == MsgType.STATUS and msg.body.get("state") == "ready":
                break
        ready = time.perf_counter() - t0
        self.acker = self.ctx.Process(target=acker_main, args=(sup,))
        self.acker.start()
        sup.close()
        return ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        for p in (self.proc, self.acker):
            with contextlib.suppress(Exception):
                p.kill()
                p.join(5)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024


# -- clients ---------------------------------------------------------------------------------


def hello_bytes(name: str) -> bytes:
    out = ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def ttfb_sequential(port: int, cctx: ssl.SSLContext, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with cctx.wrap_socket(s, server_hostname="api.example.com") as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
                assert t.recv(1)
                out.append(time.perf_counter() - t0)
    return out


async def _one(port: int, cctx: ssl.SSLContext) -> float:
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cctx,
                                         server_hostname="api.example.com")
    w.write(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    assert await r.read(1)
    dt = time.perf_counter() - t0
    w.close()
    with contextlib.suppress(Exception):
        await w.wait_closed()
    return dt


def ttfb_concurrent(port: int, cctx: ssl.SSLContext, total: int, inflight: int) -> tuple[list[float], float]:
    async def main() -> tuple[list[float], float]:
        sem = asyncio.Semaphore(inflight)
        res: list[float] = []

        async def task() -> None:
            async with sem:
                res.append(await _one(port, cctx))

        t0 = time.perf_counter()
        await asyncio.gather(*(task() for _ in range(total)))
        return res, total / (time.perf_counter() - t0)

    return uvloop.run(main())


def bulk(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(hello_bytes("bulk.example.com"))
        buf = bytearray(1 << 20)
        got, t0 = 0, time.perf_counter()
        while n := s.recv_into(buf):
            got += n
        dt = time.perf_counter() - t0
    assert got == BULK, got
    return BULK / dt


def idle_conns(port: int, n: int) -> list[socket.socket]:
    hello = hello_bytes("idle.example.com")
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(hello)
        socks.append(s)
    for s in socks:
        s.settimeout(10)
        assert s.recv(1) == b"k"
    return socks


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_seq, n_conc = (100, 300) if args.quick else (500, 2000)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=api.example.com",
                    "-addext", "subjectAltName=DNS:api.example.com"], check=True,
                   capture_output=True)
    cctx = ssl.create_default_context(cafile=str(cert))
    ctx = multiprocessing.get_context("fork")

    up_socks = {k: socket.create_server(("127.0.0.1", 0), backlog=4096) for k in ("tls", "bulk", "idle")}
    ports = {k: s.getsockname()[1] for k, s in up_socks.items()}
    up = ctx.Process(target=upstream_main, args=(up_socks, str(cert), str(key)), daemon=True)
    up.start()

    lsock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    proxy = Proxy(lsock, ports)
    proxy.start()

    hap = None
    if shutil.which("haproxy"):
        hport_sock = socket.create_server(("127.0.0.1", 0))
        hport = hport_sock.getsockname()[1]
        hport_sock.close()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(f"""global
    maxconn 5000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{hport}
    tcp-request inspect-delay 10s
    tcp-request content reject unless {{ req.ssl_hello_type 1 }}
    use_backend tls if {{ req.ssl_sni -i api.example.com }}
    use_backend bulk if {{ req.ssl_sni -i bulk.example.com }}
    tcp-request content reject unless {{ req.ssl_sni -i api.example.com bulk.example.com idle.example.com }}
    use_backend idle if {{ req.ssl_sni -i idle.example.com }}
backend tls
    server s 127.0.0.1:{ports['tls']}
backend bulk
    server s 127.0.0.1:{ports['bulk']}
backend idle
    server s 127.0.0.1:{ports['idle']}
""")
        hap = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL)
        for _ in range(200):  # wait for its listener (bounded)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", hport), 0.05):
                break
            time.sleep(0.01)

    targets: dict[str, tuple[int, int | None]] = {"direct": (ports["tls"], None),
                                                  "agentpen": (lsock.getsockname()[1], proxy.pid)}
    if hap:
        targets["haproxy"] = (hport, hap.pid)
    res: dict[str, dict[str, float]] = {k: {} for k in targets}
    for name, (port, pid) in targets.items():
        ttfb_sequential(port, cctx, 20)  # warm up
        c0 = cpu_s(pid) if pid else 0.0
        seq = ttfb_sequential(port, cctx, n_seq)
        conc, cps = ttfb_concurrent(port, cctx, n_conc, 50)
        c2 = cpu_s(pid) if pid else 0.0
        r = res[name]
        r["seq_p50_ms"], r["seq_p99_ms"] = pct(seq, 0.5), pct(seq, 0.99)
        r["c50_p50_ms"], r["c50_p99_ms"], r["conn_per_s"] = pct(conc, 0.5), pct(conc, 0.99), cps
        if pid:
            r["cpu_us_per_conn"] = (c2 - c0) / (n_seq + n_conc) * 1e6
    bulk_ports = {"direct": (ports["bulk"], None), "agentpen": (lsock.getsockname()[1], proxy.pid)}
    idle_ports = {"direct": ports["idle"], "agentpen": lsock.getsockname()[1]}
    if hap:
        bulk_ports["haproxy"] = (hport, hap.pid)
        idle_ports["haproxy"] = hport
    for name, (port, pid) in bulk_ports.items():
        c0 = cpu_s(pid) if pid else 0.0
        res[name]["bulk_MiB_s"] = bulk(port) / (1 << 20)
        if pid:
            res[name]["cpu_s_per_GB"] = (cpu_s(pid) - c0) / (BULK / 1e9)
    for name in ("agentpen", "haproxy"):
        if name not in idle_ports:
            continue
        pid = proxy.pid if name == "agentpen" else hap.pid  # type: ignore[union-attr]
        before = rss_mib(pid)
        socks = idle_conns(idle_ports[name], 1000)
        res[name]["rss_idle1000_MiB"] = rss_mib(pid)
        res[name]["rss_before_MiB"] = before
        for s in socks:
            s.close()

    # restart: a connection waits in the backlog while no worker runs
    restarts = []
    for _ in range(5 if args.quick else 20):
        os.kill(proxy.pid, signal.SIGKILL)
        proxy.proc.join(5)
        proxy.acker.kill()
        proxy.acker.join(5)
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", lsock.getsockname()[1]))
        s.sendall(hello_bytes("idle.example.com"))
        ready = proxy.start()
        s.settimeout(10)
        assert s.recv(1) == b"k"
        restarts.append((ready, time.perf_counter() - t0))
        s.close()
    res["agentpen"]["restart_ready_ms_p50"] = statistics.median(r[0] for r in restarts) * 1000
    res["agentpen"]["restart_to_first_byte_ms_p50"] = statistics.median(r[1] for r in restarts) * 1000

    proxy.stop()
    if hap:
        hap.kill()
        hap.wait()
    up.kill()
    keys = sorted({k for r in res.values() for k in r})
    print(f"{'metric':28}" + "".join(f"{n:>12}" for n in res))
    for k in keys:
        print(f"{k:28}" + "".join(f"{res[n][k]:12.2f}" if k in res[n] else f"{'-':>12}" for n in res))
    shutil.rmtree(tmp, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
