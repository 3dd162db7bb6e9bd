"""Shared end-to-end helpers: drive the real agentpen (no mocks) and a local TLS upstream.

Imported by tests as `harness` (tests/ is on sys.path through tests/conftest.py); the
fixtures built on it live in tests/conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

AGENTPEN = [sys.executable, "-m", "agentpen.supervisor"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    audit_path: Path

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def actions(self) -> list[str]:
        return [e.get("event", {}).get("action") for e in self.audit()]


@dataclass
class Sandbox:
    """A fake user home with secrets, a project inside it and a sibling repository."""

    root: Path
    home: Path
    project: Path
    sibling: Path
    state: Path
    procs: list = field(default_factory=list)  # sessions started with popen(): killed at teardown

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "XDG_STATE_HOME": str(self.state),
            "SECRET_HOST_TOKEN": "host-secret-do-not-leak",
            "SSH_AUTH_SOCK": str(self.root / "ssh-agent.sock"),
        }
        env.update(extra)
        return env

    @staticmethod
    def argv(*args: str, audit: Path) -> list[str]:
        return [*AGENTPEN, "--log-format", "json", "--audit-log", str(audit), *args]

    def popen(self, *args: str, audit: Path, **kw) -> subprocess.Popen:
        argv = self.argv(*args, audit=audit)
        kw.setdefault("cwd", self.project)
        kw.setdefault("env", self.env())
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def kill_leftover_sessions(self) -> None:
        """A test that failed half-way must not leave its agentpen running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    @staticmethod
    def leftovers(marker: str) -> list[str]:
        return leftover_processes(marker)

    def run(self, *args: str, timeout: float = 60, env: dict | None = None, audit: str | None = None,
            stdin=subprocess.DEVNULL, cwd: Path | None = None) -> Run:
        audit_path = Path(audit) if audit else self.root / f"audit-{os.urandom(4).hex()}.jsonl"
        argv = [*AGENTPEN, "--log-format", "json", "--audit-log", str(audit_path), *args]
        p = subprocess.run(argv, cwd=cwd or self.project, env=env or self.env(), capture_output=True,
                           text=True, timeout=timeout, stdin=stdin)
        return Run(p.returncode, p.stdout, p.stderr, audit_path)


def leftover_processes(marker: str) -> list[str]:
    """Processes of this user whose command line mentions marker."""
    out = subprocess.run(["ps", "-ww", "-u", str(os.getuid()), "-o", "pid=,args="], capture_output=True,
                         text=True, check=False).stdout
    return [line for line in out.splitlines() if marker in line and "ps -u" not in line]


class TlsUpstream:
    """A TLS server on the host's loopback: the 'internet' the proxy dials (pinned with
    --upstream). Serves a fixed body, or `size` bytes, per request."""

    def __init__(self, tmp: Path, name: str = "api.example.com", body: bytes = b"hello from upstream\n",
                 *, keep_open: bool = False):
        import socket
        import ssl
        import threading

        self.name = name
        self.body = body
        self.keep_open = keep_open  # like a streaming API: the server never closes first
        self.cert = tmp / "upstream-cert.pem"
        key = tmp / "upstream-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},DNS:*.{name}",
             "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True, timeout=60,
        )
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(self.cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.snis: list[str | None] = []
        self.ctx.sni_callback = lambda s, n, c: self.snis.append(n)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(20)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(self.body)
                if not self.keep_open:
                    head += b"Connection: close\r\n"
                tls.sendall(head + b"\r\n" + self.body)
                if self.keep_open:
                    tls.settimeout(60)
                    while tls.recv(4096):
                        pass
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
