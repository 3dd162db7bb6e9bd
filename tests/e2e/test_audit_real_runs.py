"""Issue 3: streams from real sessions -- allowed and denied connections, a proxy
restart, a failing command, a hash chain -- validate line by line against the shipped
JSON Schema, with gap-free sequences and right outcomes, bytes and durations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from importlib import resources

import jsonschema
import pytest


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(resources.files("agentpen.supervisor").joinpath("audit-schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def _check_stream(lines: list[dict], validator) -> None:
    assert lines, "empty audit stream"
    for line in lines:
        errors = sorted(validator.iter_errors(line), key=str)
        assert not errors, (line.get("event", {}).get("action"), [e.message for e in errors[:3]])
    seqs = [e["event"]["sequence"] for e in lines]
    assert seqs == list(range(1, len(lines) + 1)), seqs
    assert len({e["labels"]["session_id"] for e in lines}) == 1
    assert lines[0]["event"]["action"] == "session-started"
    assert lines[-1]["event"]["action"] == "session-ended"


def test_session_with_allowed_and_denied_connections(sandbox, upstream, validator):
    script = (
        f"curl -sS --max-time 10 --cacert {upstream.cert} https://{upstream.name}/ >/dev/null; "
        "curl -sS --max-time 10 -k --resolve evil.example.net:443:127.0.0.1 https://evil.example.net/ "
        ">/dev/null 2>&1; exit 5"
    )
    r = sandbox.run("--allow", upstream.name, "--upstream", f"{upstream.name}=127.0.0.1:{upstream.port}",
                    "--mount", str(upstream.cert), "--", "sh", "-c", script)
    assert r.returncode == 5, r.stderr
    lines = r.audit()
    _check_stream(lines, validator)
    by = {}
    for e in lines:
        by.setdefault(e["event"]["action"], []).append(e)
    allowed, denied, closed = by["connection-allowed"], by["connection-denied"], by["connection-closed"]
    assert allowed[0]["event"]["type"] == ["connection", "allowed", "start"]
    assert denied[0]["event"]["type"] == ["connection", "denied"]
    assert denied[0]["event"]["outcome"] == "success" and denied[0]["event"].get("reason")
    ok = [c for c in closed if c.get("destination", {}).get("domain") == upstream.name]
    assert ok and ok[0]["event"]["duration"] > 0
    assert ok[0]["source"]["bytes"] > 200 and ok[0]["destination"]["bytes"] > 200  # TLS both ways
    assert allowed[0]["destination"]["port"] == upstream.port
    end = by["session-ended"][0]
    assert end["process"]["exit_code"] == 5 and end["event"]["duration"] > 0
    counters = end["agentpen"]["counters"]
    assert counters["connections_allowed"] >= 1 and counters["connections_denied"] >= 1
    assert counters["audit"]["dropped"] == 0
    started = by["session-started"][0]["agentpen"]
    assert upstream.name in started["allowlist"] and len(started["allowlist_sha256"]) == 64


def test_worker_restart_and_chain(sandbox, validator, tmp_path):
    audit = tmp_path / "chain.jsonl"
    ready, go = sandbox.project / "ready", sandbox.project / "go"
    p = sandbox.popen("--audit-chain", "--", "sh", "-c",
                      f"touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done; exit 0",
                      audit=audit, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    while '"role":"proxy"' not in audit.read_text():  # the proxy starts shortly after "go"
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    lines = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
    proxy_pid = next(e["process"]["pid"] for e in lines if e["event"]["action"] == "worker-started"
                     and e["agentpen"].get("role") == "proxy")
    os.kill(proxy_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while '"worker-restarted"' not in audit.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    go.touch()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    lines = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
    _check_stream(lines, validator)
    exited = [e for e in lines
              if e["event"]["action"] == "worker-exited" and e["process"]["pid"] == proxy_pid]
    assert exited and exited[0]["agentpen"]["signal"] == "SIGKILL"
    restarted = [e for e in lines if e["event"]["action"] == "worker-restarted"]
    assert restarted and restarted[0]["agentpen"]["restart_count"] == 1
    # The chain verifies, and breaks when a line is edited.
    from agentpen.supervisor.audit import verify_chain

    assert verify_chain(str(audit)).ok
    text = audit.read_text().splitlines()
    text[2] = text[2].replace('"info"', '"debug"', 1)
    bad = tmp_path / "edited.jsonl"
    bad.write_text("\n".join(text) + "\n")
    assert not verify_chain(str(bad)).ok


def test_failing_command_and_setup_refusal(sandbox, validator):
    r = sandbox.run("--", "sh", "-c", "exit 3")
    assert r.returncode == 3
    _check_stream(r.audit(), validator)
    assert r.audit()[-1]["event"]["outcome"] == "success"
