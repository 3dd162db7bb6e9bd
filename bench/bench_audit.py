"""Audit stream throughput: events per second the supervisor sustains to each sink,
and the audit cost per proxied connection (connection-allowed + connection-closed).

    /opt/apvenv/bin/python bench/bench_audit.py [--events N] [--dir DIR] [--json]

Anchors in the same run: the cost of building the two event bodies alone (what a
session pays with auditing off), and a bare os.write of a line of the same size.
DIR should be on the disk the audit log will live on (default: the current
directory's file system, since /tmp may be tmpfs elsewhere); fsync figures depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from agentpen.core.events import make_event
from agentpen.supervisor.audit import AuditStream, FdSink, FileSink, JournaldSink


def allowed() -> dict:
    return make_event(
        "connection-allowed", "allowed api.anthropic.com:443", category=["network"],
        type=["connection", "allowed"], outcome="success", reason="api.anthropic.com",
        destination={"domain": "api.anthropic.com", "port": 443},
        tls={"client": {"server_name": "api.anthropic.com"}}, rule={"name": "api.anthropic.com"})


def closed() -> dict:
    return make_event(
        "connection-closed", "api.anthropic.com:443 closed after 1.5 s", category=["network"],
        type=["connection", "end"], outcome="success", event={"duration": 1_500_000_000},
        source={"bytes": 5123},
        destination={"domain": "api.anthropic.com", "port": 443, "ip": "160.79.104.10",
                     "bytes": 80211})


def denied() -> dict:
    return make_event(
        "connection-denied", "blocked evil.example:443", level="warning", category=["network"],
        type=["connection", "denied"], outcome="success", reason="not in the allowlist",
        destination={"domain": "evil.example", "port": 443},
        tls={"client": {"server_name": "evil.example"}})


def rate(fn: Callable[[], None], n: int, repeat: int = 5) -> float:
    """Best-of-`repeat` operations per second for n calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def stream_rate(make_sinks: Callable[[], list], n: int, *, chain: bool = False,
                body: Callable[[], dict] = allowed) -> float:
    rates = []
    for _ in range(3):
        stream = AuditStream("bench", make_sinks(), chain=chain)
        t0 = time.perf_counter()
        for _ in range(n):
            stream.emit(body(), sender="proxy", pid=1234)
        stream.tick(time.monotonic() + 2)  # the deferred fsync belongs to the cost
        rates.append(n / (time.perf_counter() - t0))
        assert stream.healthy and stream.counters["dropped"] == 0
        stream.close()
    return max(rates)


def drain(fd: int) -> threading.Thread:
    def run() -> None:
        while os.read(fd, 1 << 16):
            pass
        os.close(fd)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--dir", default=os.getcwd())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n = args.events
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-audit-") as d:
        counter = [0]

        def new_file() -> list:
            counter[0] += 1
            return [FileSink(os.path.join(d, f"a{counter[0]}.jsonl"))]

        line = AuditStream("bench", [FileSink(os.devnull)])
        sample = len(json.dumps(allowed())) + 300  # about a stamped line's size
        line.close()
        fd = os.open(os.path.join(d, "raw"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        data = b"x" * sample + b"\n"
        out["anchor: os.write of a line, /s"] = rate(lambda: os.write(fd, data), n)
        os.close(fd)
        out["anchor: build two bodies (auditing off), /s"] = rate(
            lambda: (allowed(), closed()), n)
        out["file, /s"] = stream_rate(new_file, n)
        out["file + chain, /s"] = stream_rate(new_file, n, chain=True)
        out["file, durable (denied: fsync each), /s"] = stream_rate(
            new_file, max(200, n // 50), body=denied)
        out["/dev/null (no fsync), /s"] = stream_rate(lambda: [FileSink(os.devnull)], n)

        def pipe_sink() -> list:
            r, w = os.pipe()
            drain(r)
            return [FdSink(w)]
        out["--audit-fd pipe, /s"] = stream_rate(pipe_sink, n)

        jpath = os.path.join(d, "journal.socket")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(jpath)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        stop = threading.Event()

        def jdrain() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    server.recv(1 << 20)
        t = threading.Thread(target=jdrain, daemon=True)
        t.start()
        out["journald socket (fake reader), /s"] = stream_rate(lambda: [JournaldSink(jpath)], n)
        stop.set()
        t.join(2)
        server.close()

        # Per proxied connection: two events, allowed at accept and closed at the end.
        stream = AuditStream("bench", new_file())
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 2):
                stream.emit(allowed(), sender="proxy", pid=1)
                stream.emit(closed(), sender="proxy", pid=1)
            samples.append((time.perf_counter() - t0) / (n // 2))
        stream.close()
        bodies = 1 / out["anchor: build two bodies (auditing off), /s"]
        out["per connection, auditing on, us"] = min(samples) * 1e6
        out["per connection, auditing off (bodies only), us"] = bodies * 1e6
        out["per connection, audit cost, us"] = (min(samples) - bodies) * 1e6
        out["per connection, median on, us"] = statistics.median(samples) * 1e6
    if args.json:
        print(json.dumps({k: round(v, 1) for k, v in out.items()}, indent=1))
    else:
        print(f"audit benchmark: {n} events, python {sys.version.split()[0]}, dir {args.dir}")
        for k, v in out.items():
            print(f"  {k:<52} {v:>12,.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
