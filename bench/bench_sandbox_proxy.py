"""Proxy figures through the real sandbox path, with HAProxy and a direct connection as
anchors measured in the same session.

    su aptest -c '/opt/apvenv/bin/python bench/bench_sandbox_proxy.py [--quick] [--json]'

One agentpen session runs a client (stdlib python3, inside the jail) that takes orders
on stdin and answers on stdout; the host side samples CPU and RSS of each process
between orders. Three paths, all starting inside the sandbox:

* agentpen: the sandbox's 127.0.0.1:443 -> proxy worker (host) -> upstream (pinned
  with --upstream, since the upstream is a local TLS server);
* haproxy:  the sandbox's 127.0.0.1:H -> pasta's --host-port splice -> HAProxy 2.6 on the
  host's 127.0.0.1:H (mode tcp, req.ssl_sni allowlist) -> upstream;
* direct:   the sandbox's 127.0.0.1:U -> pasta's --host-port splice -> upstream.

HAProxy and direct pay pasta's splice (its CPU is reported), agentpen does not: that is
the architecture (the proxy accepts on sockets that live in the sandbox's namespace).
Upstream: a uvloop process with a TLS port (one HTTP response per connection), a bulk
port and an idle port (raw bytes after the ClientHello, which they skip).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import AGENTPEN, audit_events, comm, cpu_s, descendants, pct, require_unprivileged, status_kib

BULK = 1 << 30
NAMES = {"tls": "api.example.com", "bulk": "bulk.example.com", "idle": "idle.example.com"}

# -- upstream (host) ---------------------------------------------------------------------


class _Raw(asyncio.Protocol):
    """Skips the ClientHello (first TLS record), then acts by port kind."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind, self.left, self.buf, self.paused, self.started = kind, size, b"", False, False

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        if self.started:
            return
        self.buf += data
        if len(self.buf) < 5 or len(self.buf) < 5 + int.from_bytes(self.buf[3:5], "big"):
            return
        self.started = True
        if self.kind == "idle":
            self.t.write(b"k")
        else:
            self.chunk = bytes(1 << 20)
            self._pump()

    def _pump(self) -> None:
        while self.left > 0 and not self.paused:
            n = min(self.left, len(self.chunk))
            self.t.write(self.chunk[:n] if n < len(self.chunk) else self.chunk)
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
            # The client closes (it reads the first byte and hangs up): a server-side
            # close right after the write races the data with close_notify in uvloop.
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def upstream_main(socks: dict[str, socket.socket], cert: str, key: str) -> None:
    import uvloop

    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(cert, key)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_Http, sock=socks["tls"], ssl=sctx, backlog=4096)
        await loop.create_server(lambda: _Raw("bulk", BULK), sock=socks["bulk"], backlog=4096)
        await loop.create_server(lambda: _Raw("idle", 0), sock=socks["idle"], backlog=4096)
        await asyncio.Event().wait()

    uvloop.run(main())


def haproxy_cfg(port: int, ports: dict[str, int]) -> str:
    return f"""global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 10s
    tcp-request content reject unless {{ req.ssl_hello_type 1 }}
    tcp-request content reject unless {{ req.ssl_sni -i {' '.join(NAMES.values())} }}
    use_backend tls if {{ req.ssl_sni -i {NAMES['tls']} }}
    use_backend bulk if {{ req.ssl_sni -i {NAMES['bulk']} }}
    use_backend idle if {{ req.ssl_sni -i {NAMES['idle']} }}
backend tls
    server s 127.0.0.1:{ports['tls']}
backend bulk
    server s 127.0.0.1:{ports['bulk']}
backend idle
    server s 127.0.0.1:{ports['idle']}
"""


# -- client (inside the sandbox; stdlib only, run by /usr/bin/python3) --------------------

CLIENT = r'''
import asyncio, json, resource, socket, ssl, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
CA = sys.argv[1]
CTX = ssl.create_default_context(cafile=CA)

def hello(name):
    out = ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else None

def seq(port, name, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with CTX.wrap_socket(s, server_hostname=name) as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n")
                assert t.recv(1)
                out.append(time.perf_counter() - t0)
    return {"p50_ms": pct(out, .5), "p99_ms": pct(out, .99), "n": n, "samples": out}

async def _one(port, name):
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=CTX, server_hostname=name)
    w.write(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n")
    assert await r.read(1)
    dt = time.perf_counter() - t0
    w.close()
    try:
        await w.wait_closed()
    except Exception:
        pass
    return dt

def conc(port, name, total, inflight):
    async def main():
        sem = asyncio.Semaphore(inflight)
        res, errors = [], 0
        async def task():
            nonlocal errors
            async with sem:
                try:
                    res.append(await _one(port, name))
                except Exception:
                    errors += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(task() for _ in range(total)))
        return res, total / (time.perf_counter() - t0), errors
    res, cps, errors = asyncio.run(main())
    return {"p50_ms": pct(res, .5), "p99_ms": pct(res, .99), "conn_per_s": cps, "n": total,
            "inflight": inflight, "errors": errors, "samples": res}

def bulk(port, name):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(hello(name))
        buf = bytearray(1 << 20)
        got, t0 = 0, time.perf_counter()
        while n := s.recv_into(buf):
            got += n
        dt = time.perf_counter() - t0
    return {"bytes": got, "MiB_s": got / dt / (1 << 20)}

IDLE = []
def idle_open(port, name, n):
    h = hello(name)
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(h)
        IDLE.append(s)
    for s in IDLE:
        s.settimeout(20)
        assert s.recv(1) == b"k"
    return {"open": len(IDLE)}

def idle_close():
    n = len(IDLE)
    for s in IDLE:
        s.close()
    IDLE.clear()
    return {"closed": n}

def one(port, name):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(hello(name))
    s.settimeout(20)
    assert s.recv(1) == b"k"
    t = time.monotonic()
    s.close()
    return {"t": t}

OPS = {"seq": seq, "conc": conc, "bulk": bulk, "idle_open": idle_open, "idle_close": idle_close, "one": one}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    if op == "quit":
        break
    try:
        out = OPS[op](**cmd)
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
'''


# -- host side -------------------------------------------------------------------------


class Env:
    """Upstream, HAProxy and certificates for a whole benchmark run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cert, self.key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(self.key), "-out",
                        str(self.cert), "-days", "2", "-subj", "/CN=api.example.com",
                        "-addext", "subjectAltName=DNS:api.example.com"], check=True,
                       capture_output=True)
        socks = {k: socket.create_server(("127.0.0.1", 0), backlog=4096) for k in NAMES}
        self.ports = {k: s.getsockname()[1] for k, s in socks.items()}
        ctx = multiprocessing.get_context("fork")
        self.up = ctx.Process(target=upstream_main, args=(socks, str(self.cert), str(self.key)),
                              daemon=True)
        self.up.start()
        for s in socks.values():
            s.close()
        probe = socket.create_server(("127.0.0.1", 0))
        self.hport = probe.getsockname()[1]
        probe.close()
        self.hap: subprocess.Popen | None = None
        hap = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
        if hap:
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(haproxy_cfg(self.hport, self.ports))
            self.hap = subprocess.Popen([hap, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            for _ in range(400):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.hport), 0.05):
                    break
                time.sleep(0.01)

    def close(self) -> None:
        if self.hap:
            self.hap.kill()
            self.hap.wait()
        self.up.kill()
        self.up.join(5)


class Session:
    """One agentpen session running the client."""

    def __init__(self, env: Env, *, extra_allow: list[str] | None = None,
                 audit: Path | None = None, tag: str = "main") -> None:
        self.env = env
        self.project = env.tmp / f"project-{tag}"
        self.project.mkdir()
        (self.project / "client.py").write_text(CLIENT)
        shutil.copy(env.cert, self.project / "ca.pem")
        self.audit = audit or env.tmp / f"audit-{tag}.jsonl"
        self.audit_file = env.tmp / f"audit-{tag}.jsonl" if audit is None else None
        allow = [*NAMES.values(), *(extra_allow or [])]
        allow_file = env.tmp / f"allow-{tag}.txt"
        argv = [*AGENTPEN, "--log-format", "json", "--log-level", "warning", "--audit-log", str(self.audit)]
        argv += [f"--allow={a}" for a in allow]
        argv += [f"--upstream={NAMES[k]}=127.0.0.1:{p}" for k, p in env.ports.items()]
        argv += [f"--host-port={p}" for p in [*env.ports.values(), env.hport]]
        argv += ["--", "/usr/bin/python3", str(self.project / "client.py"), str(self.project / "ca.pem")]
        del allow_file
        self.stderr = open(env.tmp / f"stderr-{tag}.txt", "w")  # noqa: SIM115
        self.p = subprocess.Popen(argv, cwd=self.project, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.stderr, text=True, bufsize=1)
        first = self.p.stdout.readline()  # type: ignore[union-attr]
        if not first:
            err = (env.tmp / f"stderr-{tag}.txt").read_text()[-2000:]
            raise RuntimeError(f"session did not start: {err}")
        assert json.loads(first).get("ready"), first

    def ask(self, op: str, **kw: Any) -> dict:
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")  # type: ignore[union-attr]
        line = self.p.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("client went away")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"{op}: {out['error']}")
        return out

    def pids(self) -> dict[str, int]:
        out = {"supervisor": self.p.pid}
        for e in reversed(audit_events(Path(self.audit))):
            if e["event"]["action"] in ("worker-started", "worker-restarted") and \
                    e.get("agentpen", {}).get("role") == "proxy":
                out["agentpen"] = e["process"]["pid"]
                break
        for pid in descendants(self.p.pid):
            if comm(pid).startswith("passt") or comm(pid) == "pasta":
                out["pasta"] = pid
        if self.env.hap:
            out["haproxy"] = self.env.hap.pid
        return out

    def cpu(self) -> dict[str, float]:
        return {k: cpu_s(pid) for k, pid in self.pids().items()}

    def close(self) -> int:
        with contextlib.suppress(Exception):
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")  # type: ignore[union-attr]
            self.p.stdin.close()  # type: ignore[union-attr]
        rc = self.p.wait(30)
        self.stderr.close()
        return rc


def targets(env: Env, kind: str) -> dict[str, tuple[int, str]]:
    t = {"agentpen": (443, NAMES[kind]), "direct": (env.ports[kind], NAMES[kind])}
    if env.hap:
        t["haproxy"] = (env.hport, NAMES[kind])
    return t


def _pct(xs: list[float], p: float) -> float:
    return pct(xs, p) * 1000


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in b if k in a}


def main_figures(env: Env, quick: bool) -> dict:
    n_seq, n_conc = (100, 300) if quick else (400, 1500)
    s = Session(env)
    res: dict[str, dict[str, Any]] = {}
    try:
        # Rounds, the paths taking turns within each: noise from the rest of the machine
        # spreads over all three instead of landing on whichever ran at a bad moment.
        rounds = 5
        tls = targets(env, "tls")
        seq_s: dict[str, list[float]] = {k: [] for k in tls}
        conc_s: dict[str, list[float]] = {k: [] for k in tls}
        conc_t = dict.fromkeys(tls, 0.0)
        cpu: dict[str, dict[str, float]] = {k: {} for k in tls}
        for port, sni in tls.values():
            s.ask("seq", port=port, name=sni, n=20)  # warm up
        for _ in range(rounds):
            for name, (port, sni) in tls.items():
                c0 = s.cpu()
                seq_s[name] += s.ask("seq", port=port, name=sni, n=n_seq // rounds)["samples"]
                cc = s.ask("conc", port=port, name=sni, total=n_conc // rounds, inflight=50)
                for proc, v in delta(c0, s.cpu()).items():
                    cpu[name][proc] = cpu[name].get(proc, 0.0) + v
                conc_s[name] += cc["samples"]
                conc_t[name] += cc["n"] / cc["conn_per_s"]
        for name in tls:
            r = res.setdefault(name, {})
            r.update({"seq_p50_ms": _pct(seq_s[name], 0.5), "seq_p99_ms": _pct(seq_s[name], 0.99),
                      "c50_p50_ms": _pct(conc_s[name], 0.5), "c50_p99_ms": _pct(conc_s[name], 0.99),
                      "conn_per_s": len(conc_s[name]) / conc_t[name]})
            conns = len(seq_s[name]) + len(conc_s[name])
            for proc, v in cpu[name].items():
                r[f"cpu_us_per_conn[{proc}]"] = v / conns * 1e6
        for name, (port, sni) in targets(env, "bulk").items():
            c0 = s.cpu()
            b = s.ask("bulk", port=port, name=sni)
            d = delta(c0, s.cpu())
            res[name]["bulk_MiB_s"] = b["MiB_s"]
            for proc, v in d.items():
                res[name][f"cpu_s_per_GB[{proc}]"] = v / (b["bytes"] / 1e9)
        pids = s.pids()
        for name, (port, sni) in targets(env, "idle").items():
            watch = {"agentpen": ["agentpen", "supervisor"], "haproxy": ["haproxy"],
                     "direct": ["pasta"]}[name]
            before = {w: status_kib(pids[w], "VmRSS") / 1024 for w in watch if w in pids}
            s.ask("idle_open", port=port, name=sni, n=1000)
            for w in watch:
                if w in pids:
                    res[name][f"rss_idle1000_MiB[{w}]"] = status_kib(pids[w], "VmRSS") / 1024
                    res[name][f"rss_before_MiB[{w}]"] = before[w]
            s.ask("idle_close")
        # Scaling with concurrent connections (agentpen and the anchors).
        levels = [1, 10, 100] if quick else [1, 10, 100, 1000]
        scale: dict[str, dict[str, Any]] = {}
        for name, (port, sni) in targets(env, "tls").items():
            for k in levels:
                total = max(100 if quick else 200, 2 * k)
                c0 = s.cpu()
                cc = s.ask("conc", port=port, name=sni, total=total, inflight=k)
                d = delta(c0, s.cpu())
                main_proc = {"agentpen": "agentpen", "haproxy": "haproxy", "direct": "pasta"}[name]
                scale.setdefault(name, {})[str(k)] = {
                    "p50_ms": cc["p50_ms"], "p99_ms": cc["p99_ms"], "conn_per_s": cc["conn_per_s"],
                    "errors": cc["errors"], "cpu_us_per_conn": d.get(main_proc, 0) / total * 1e6}
        res["_concurrency"] = scale
        # Restart: kill -9, then a connection opened at once must be served by the next worker.
        restarts = []
        s.ask("one", port=443, name=NAMES["idle"])
        pid = s.pids()["agentpen"]
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        one = s.ask("one", port=443, name=NAMES["idle"])
        restarts.append((one["t"] - t_kill) * 1000)
        res["agentpen"]["restart_to_first_byte_ms"] = restarts[0]
        ev = {e["event"]["action"]: e for e in audit_events(Path(s.audit))
              if e["event"]["action"] in ("worker-exited", "worker-restarted")
              and e.get("agentpen", {}).get("role") == "proxy"}
        if len(ev) == 2:
            from _common import ts
            gap = ts(ev["worker-restarted"]) - ts(ev["worker-exited"])
            res["agentpen"]["restart_audited_ms"] = gap * 1000
    finally:
        rc = s.close()
    res["_session_exit"] = rc
    return res


def allowlist_scaling(env: Env, quick: bool) -> dict:
    """Per-connection cost (sequential TTFB, proxy + supervisor CPU) with 1, 100 and
    10,000 allowlist entries (half exact names, half *.suffix wildcards)."""
    out = {}
    n = 100 if quick else 300
    for size in (1, 100, 10000):
        extra = [f"host{i}.example.net" if i % 2 else f"*.zone{i}.example.org"
                 for i in range(max(0, size - 3))]
        s = Session(env, extra_allow=extra, tag=f"allow{size}")
        try:
            s.ask("seq", port=443, name=NAMES["tls"], n=20)
            c0 = s.cpu()
            sq = s.ask("seq", port=443, name=NAMES["tls"], n=n)
            d = delta(c0, s.cpu())
            out[str(size)] = {"seq_p50_ms": sq["p50_ms"], "seq_p99_ms": sq["p99_ms"],
                              "cpu_us_per_conn[agentpen]": d["agentpen"] / n * 1e6,
                              "cpu_us_per_conn[supervisor]": d["supervisor"] / n * 1e6}
        finally:
            s.close()
    return out


def audit_sinks(env: Env, quick: bool) -> dict:
    """What a connection costs with the audit stream to a file versus to /dev/null
    (the cheapest sink: the stream is not optional, so 'off' is this)."""
    out = {}
    n = 100 if quick else 300
    for label, path in (("file", None), ("devnull", Path(os.devnull))):
        s = Session(env, audit=path, tag=f"audit-{label}")
        try:
            s.ask("seq", port=443, name=NAMES["tls"], n=20)
            c0 = s.cpu()
            sq = s.ask("seq", port=443, name=NAMES["tls"], n=n)
            d = delta(c0, s.cpu())
            out[label] = {"seq_p50_ms": sq["p50_ms"],
                          "cpu_us_per_conn[agentpen]": d.get("agentpen", float("nan")) / n * 1e6,
                          "cpu_us_per_conn[supervisor]": d["supervisor"] / n * 1e6}
        finally:
            s.close()
    return out


def run(quick: bool = False, parts: tuple[str, ...] = ("main", "allowlist", "audit")) -> dict:
    require_unprivileged()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # HAProxy's maxconn needs ~16k
    d = tempfile.mkdtemp(prefix="bench-sbx-")  # BENCH_KEEP=1 keeps it (audit logs, stderr)
    env = Env(Path(d))
    try:
        out: dict[str, Any] = {"haproxy": bool(env.hap)}
        if "main" in parts:
            out["paths"] = main_figures(env, quick)
        if "allowlist" in parts:
            out["allowlist"] = allowlist_scaling(env, quick)
        if "audit" in parts:
            out["audit"] = audit_sinks(env, quick)
    finally:
        env.close()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(d, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="main,allowlist,audit")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.quick, tuple(args.parts.split(","))), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
