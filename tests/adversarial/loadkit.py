"""Host side of the load and fault suites: an asyncio TLS upstream that can hold
thousands of connections, and the checks every scenario ends with (audit lines
parse, nothing left behind). Used by test_load.py, test_faults.py and
bench/load_full.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "loadclient.py"


class AsyncTlsUpstream:
    """The 'internet': a TLS server on the host's 127.0.0.1 in its own thread and
    event loop. Each connection: handshake, read one request, answer 200, close.
    Counts what it saw, including the peak of concurrently open connections."""

    def __init__(self, tmp: Path, name: str = "api.example.com") -> None:
        self.name = name
        self.cert = tmp / "upstream-cert.pem"
        key = tmp / "upstream-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True, timeout=60)
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(self.cert, key)
        self.accepted = self.handshakes = self.served = self.open = self.peak = 0
        self.closed = 0
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("upstream did not start")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot():
            self.server = await asyncio.start_server(
                self._handle, "127.0.0.1", 0, ssl=self.ctx, backlog=4096,
                ssl_handshake_timeout=30)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()

        self.loop.run_until_complete(boot())
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.accepted += 1
            self.handshakes += 1  # start_server hands us the stream after the handshake
            self.open += 1
            self.peak = max(self.peak, self.open)
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 600)
            body = b"hello from upstream\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
            await writer.drain()
            with self._lock:
                self.served += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            with self._lock:
                self.open -= 1
                self.closed += 1
            writer.close()

    def close(self) -> None:
        async def stop():
            self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def pin_args(up) -> list[str]:
    return ["--allow", up.name, "--upstream", f"{up.name}=127.0.0.1:{up.port}", "--mount", str(up.cert)]


def install_client(project: Path) -> Path:
    dst = project / "loadclient.py"
    shutil.copyfile(CLIENT, dst)
    return dst


def client_args(up, **kw) -> str:
    return json.dumps({"host": up.name, "cafile": str(up.cert), **kw})


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30.0, step: float = 0.01):
    """Poll a real condition with a bound; returns its (truthy) value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def audit_lines(path: Path) -> list[dict]:
    """Every line written parses (the promise); a torn or garbled line fails here."""
    if not path.is_file():  # absent, or a device such as /dev/full
        return []
    out = []
    for i, line in enumerate(path.read_bytes().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as exc:
            raise AssertionError(f"audit line {i + 1} of {path} does not parse: {line[:200]!r}") from exc
    return out


def actions(events: list[dict]) -> list[str]:
    return [e["event"]["action"] for e in events]


def role_pid(path: Path, role: str) -> int | None:
    """The pid of the latest worker-started/-restarted event of a role, from the audit."""
    try:
        events = audit_lines(path)
    except AssertionError:
        return None  # a line being written right now; the caller polls again
    pids = [e["process"]["pid"] for e in events
            if e["event"]["action"] in ("worker-started", "worker-restarted")
            and e.get("agentpen", {}).get("role") == role and e.get("process", {}).get("pid")]
    return pids[-1] if pids else None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for k in children(todo.pop()):
            out.append(k)
            todo.append(k)
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def my_processes() -> set[int]:
    """Pids of this user's live processes (leak check by set difference)."""
    uid = os.getuid()
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid and alive(int(d)):
                    out.add(int(d))
            except OSError:
                pass
    return out


def user_namespaces() -> set[str]:
    """User and net namespaces held by this user's processes (ns leak check)."""
    out = set()
    for pid in my_processes():
        for ns in ("user", "net", "mnt"):
            with contextlib.suppress(OSError):
                out.add(os.readlink(f"/proc/{pid}/ns/{ns}"))
    return out


def tmp_entries() -> set[str]:
    try:
        return {e for e in os.listdir("/tmp") if os.stat(os.path.join("/tmp", e)).st_uid == os.getuid()}
    except OSError:
        return set()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class ScenarioRun:
    """One agentpen session running loadclient.py SCENARIO inside the sandbox, watched
    from the host: the proxy's pid and RSS (from the audit stream's worker-started
    event), every pid of the session's tree (for the leak check)."""

    def __init__(self, popen: Callable[..., subprocess.Popen], project: Path, audit: Path,
                 up, scenario: str, *, extra_args: list[str] | None = None,
                 sandbox_prefix: str = "", **kw) -> None:
        install_client(project)
        self.project, self.audit, self.up = project, audit, up
        self.ctl = project / f"ctl-{scenario}"
        self.ctl.mkdir(exist_ok=True)
        self.result_path = project / f"result-{scenario}.json"
        kw.setdefault("ctl", str(self.ctl))
        script = (f"{sandbox_prefix}exec python3 loadclient.py {scenario} '{client_args(up, **kw)}' "
                  f"{self.result_path}")
        self.t0 = time.monotonic()
        self.proc = popen(*pin_args(up), *(extra_args or []), "--", "sh", "-c", script,
                          audit=audit, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pids: set[int] = {self.proc.pid}
        self.proxy_pid: int | None = None
        self.rss: dict[str, int | None] = {}
        self.fds: dict[str, int | None] = {}

    def sample(self, label: str) -> None:
        """Record the proxy's RSS and descriptor count now, and the session's pids."""
        self.watch()
        if self.proxy_pid is None:
            self.proxy_pid = wait_for(lambda: role_pid(self.audit, "proxy"), "the proxy's pid")
        self.rss[label] = rss_kib(self.proxy_pid)
        self.fds[label] = fd_count(self.proxy_pid)

    def watch(self) -> None:
        self.pids.update(descendants(self.proc.pid))
        if self.proxy_pid is not None:
            rss = rss_kib(self.proxy_pid)
            if rss is not None and rss > (self.rss.get("peak") or 0):
                self.rss["peak"] = rss

    def wait_held(self, timeout: float = 120.0) -> dict:
        path = self.ctl / "held"

        def ready():
            self.watch()
            if self.proc.poll() is not None:
                raise AssertionError(f"agentpen exited early ({self.proc.returncode}): "
                                     f"{self.proc.stderr.read() if self.proc.stderr else ''}")
            return path.exists()

        wait_for(ready, "the client to hold its connections", timeout, step=0.05)
        return json.loads(path.read_text())

    def go(self) -> None:
        (self.ctl / "go").touch()

    def finish(self, timeout: float = 180.0) -> tuple[int, dict, str, list[dict]]:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.watch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.2)
        if self.proc.poll() is None:
            self.proc.kill()
            raise AssertionError(f"agentpen did not end within {timeout:g} s")
        _out, err = self.proc.communicate(timeout=30)
        self.seconds = time.monotonic() - self.t0
        result = json.loads(self.result_path.read_text()) if self.result_path.exists() else {}
        return self.proc.returncode, result, err, audit_lines(self.audit)

    def leftovers(self) -> list[str]:
        """Any pid of this session still alive (bounded wait: the kernel reaps async)."""
        deadline = time.monotonic() + 10
        while True:
            left = [f"{p} {comm(p)} {cmdline(p)[:120]}" for p in sorted(self.pids) if alive(p)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)


def stderr_problems(err: str) -> list[str]:
    """agentpen's stderr must be JSON lines (--log-format json) and never a traceback."""
    bad = []
    if "Traceback" in err:
        bad.append("traceback on stderr")
    for line in err.splitlines():
        if line.strip() and not line.startswith("{"):
            bad.append(f"non-JSON stderr line: {line[:200]}")
    return bad
