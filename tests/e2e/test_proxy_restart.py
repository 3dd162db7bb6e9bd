"""Issue 4: a crashed proxy is restarted without killing the command and without
refusing a connection opened during the restart window."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time


def _events(path):
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def _wait(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_kill_9_of_the_proxy_keeps_the_command_and_serves_the_next_connection(sandbox, upstream):
    audit = sandbox.root / "restart.jsonl"
    ready, go = sandbox.project / "ready", sandbox.project / "go"
    script = (
        f"touch {ready}; while [ ! -e {go} ]; do sleep 0.01; done; "
        f"curl -sS --max-time 20 --cacert {upstream.cert} https://{upstream.name}/; echo rc=$?"
    )
    p = sandbox.popen(
        "--allow", upstream.name, "--upstream", f"{upstream.name}=127.0.0.1:{upstream.port}",
        "--mount", str(upstream.cert), "--", "sh", "-c", script,
        audit=audit, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait(ready.exists, "the command to start")
    _wait(lambda: '"role":"proxy"' in audit.read_text(), "the proxy (it starts shortly after go)")
    proxy = [e for e in _events(audit) if e["event"]["action"] == "worker-started"
             and e.get("agentpen", {}).get("role") == "proxy"]
    assert proxy, "no proxy worker-started event"
    pid = proxy[-1]["process"]["pid"]
    os.kill(pid, signal.SIGKILL)
    go.touch()  # the command connects right away: during the restart window
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "hello from upstream" in out and "rc=0" in out, (out, err)
    events = _events(audit)
    actions = [e["event"]["action"] for e in events]
    exited = [e for e in events if e["event"]["action"] == "worker-exited"
              and e["process"]["pid"] == pid]
    assert exited and exited[0]["agentpen"]["signal"] == "SIGKILL", actions
    assert "worker-restarted" in actions
    assert actions.index("worker-restarted") > actions.index("worker-exited")
    assert any(e["event"]["action"] == "connection-allowed" for e in events)
