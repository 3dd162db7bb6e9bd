"""Test doubles and example events shared by tests/unit/test_audit_*.py."""

from __future__ import annotations

import errno
import json
from importlib import resources
from typing import Any

from agentpen.core.events import make_event
from agentpen.supervisor.audit.sinks import Sink


class FakeSink(Sink):
    """Records every line and fsync; fails on demand with a chosen errno."""

    def __init__(self, name: str = "fake", *, needs_sync: bool = True) -> None:
        self.name = name
        self.needs_sync = needs_sync
        self.lines: list[bytes] = []
        self.syncs = 0
        self.synced_upto = 0  # number of lines that were followed by an fsync
        self.reopens = 0
        self.fail_write: int | None = None  # errno
        self.fail_sync: int | None = None
        self.closed = False

    def write(self, line: bytes, record: dict[str, Any]) -> None:
        if self.fail_write is not None:
            raise OSError(self.fail_write, errno.errorcode[self.fail_write])
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        self.lines.append(line)

    def sync(self) -> None:
        if self.fail_sync is not None:
            raise OSError(self.fail_sync, errno.errorcode[self.fail_sync])
        self.syncs += 1
        self.synced_upto = len(self.lines)

    def reopen(self) -> None:
        self.reopens += 1

    def close(self) -> None:
        self.closed = True

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


def load_schema() -> dict[str, Any]:
    text = resources.files("agentpen.supervisor").joinpath("audit-schema.json").read_text()
    return json.loads(text)


def example_events() -> dict[str, dict[str, Any]]:
    """One representative body per action the project emits, shaped as the supervisor
    and the workers build them (core.events.make_event)."""
    conn = {"domain": "api.anthropic.com", "port": 443}
    return {
        "session-started": make_event(
            "session-started", "session started: claude (claude) in /home/u/p",
            category=["process", "session"], type=["start"], outcome="success",
            process={"name": "claude", "args": ["claude", "--help"],
                     "executable": "/usr/bin/claude", "working_directory": "/home/u/p"},
            agentpen={"version": "0.1.0", "profile": "untrusted", "agent": "claude",
                      "project": "/home/u/p", "allowlist": ["api.anthropic.com"],
                      "allowlist_sha256": "0" * 64, "layers": {"seccomp": "pyseccomp"}}),
        "setup-step": make_event(
            "setup-step", "nftables ruleset loaded and read back", category=["configuration"],
            type=["creation"], outcome="success", event={"duration": 1_200_000},
            agentpen={"step": "nft"}),
        "worker-started": make_event(
            "worker-started", "proxy worker started (pid 4242)", category=["process"],
            type=["start"], outcome="success", process={"pid": 4242, "name": "agentpen-proxy"}),
        "worker-exited": make_event(
            "worker-exited", "proxy worker exited (signal SIGKILL)", level="error",
            category=["process"], type=["end"], outcome="failure",
            process={"pid": 4242, "name": "agentpen-proxy"}, agentpen={"signal": "SIGKILL"}),
        "worker-restarted": make_event(
            "worker-restarted", "proxy worker restarted (pid 4250, incarnation 2)",
            level="warning", category=["process"], type=["start"], outcome="success",
            process={"pid": 4250, "name": "agentpen-proxy"},
            agentpen={"incarnation": 2, "restart_count": 1}),
        "connection-allowed": make_event(
            "connection-allowed", "allowed api.anthropic.com:443", category=["network"],
            type=["connection", "allowed"], outcome="success", reason="api.anthropic.com",
            destination=conn, tls={"client": {"server_name": "api.anthropic.com"}},
            rule={"name": "api.anthropic.com"}, network={"transport": "tcp"}),
        "connection-denied": make_event(
            "connection-denied", "blocked evil.example:443: not in the allowlist",
            level="warning", category=["network"], type=["connection", "denied"],
            outcome="success", reason="server name not in the allowlist",
            destination={"domain": "evil.example", "port": 443},
            tls={"client": {"server_name": "evil.example"}}),
        "connection-closed": make_event(
            "connection-closed", "api.anthropic.com:443 closed after 1.5 s",
            category=["network"], type=["connection", "end"], outcome="success",
            event={"duration": 1_500_000_000},
            source={"bytes": 5123}, destination={**conn, "ip": "160.79.104.10", "bytes": 80211},
            tls={"client": {"server_name": "api.anthropic.com"}}),
        "connection-upstream-error": make_event(
            "connection-upstream-error", "api.anthropic.com:443: connection refused",
            level="warning", category=["network"], type=["connection", "error"],
            outcome="failure", reason="ECONNREFUSED", destination=conn,
            error={"message": "connection refused"}),
        "dns-refused": make_event(
            "dns-refused", "DNS lookup of evil.example refused: not in the allowlist",
            level="warning", category=["network"], type=["denied"], outcome="success",
            reason="name not in the allowlist",
            dns={"question": {"name": "evil.example", "type": "A"}}),
        "session-ended": make_event(
            "session-ended", "session ended: exit status 3", category=["process", "session"],
            type=["end"], outcome="success", event={"duration": 4_000_000_000},
            process={"exit_code": 3, "name": "claude"},
            agentpen={"counters": {"connections": 2}}),
    }
