"""Issue 2: `agentpen --check` probes the real layers of this host."""

from __future__ import annotations

import json
import subprocess

from harness import AGENTPEN


def test_check_json_reports_every_layer_and_exit_0_when_enforceable(sandbox):
    p = subprocess.run([*AGENTPEN, "--check", "--json"], capture_output=True, text=True, timeout=60,
                       env=sandbox.env())
    report = json.loads(p.stdout)
    names = {layer["name"] for layer in report["layers"]}
    for needed in ("user namespaces", "bubblewrap", "pasta", "/dev/net/tun", "nftables", "seccomp",
                   "kernel"):
        assert any(needed in n for n in names), (needed, names)
    assert p.returncode == (0 if report["ok"] else 1)
    # This CI host is prepared to enforce everything (.ci/run makes /dev/net/tun usable).
    assert report["ok"], [x for x in report["layers"] if not x["ok"]]


def test_check_table_is_readable(sandbox):
    p = subprocess.run([*AGENTPEN, "--check"], capture_output=True, text=True, timeout=60,
                       env=sandbox.env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nftables" in p.stdout and "ok" in p.stdout
