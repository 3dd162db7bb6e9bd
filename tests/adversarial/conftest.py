"""Fixtures for the attack battery. The shared harness (sandbox, upstream) is tests/conftest.py.

`prober` runs tests/adversarial/probe.py inside the sandbox through the full `agentpen`
command, and the same probe on the host as the positive control."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

PY = "/usr/bin/python3"  # the system python: visible read-only inside the sandbox
PROBE = Path(__file__).with_name("probe.py")


def parse_probe(text: str) -> dict:
    lines = [x for x in text.replace("\r", "").splitlines() if "PROBE {" in x]
    assert lines, f"the probe printed no result: {text[-3000:]!r}"
    line = lines[-1]
    return json.loads(line[line.index("PROBE ") + 6 :])


@dataclass
class Prober:
    sandbox: object
    script: Path
    parse = staticmethod(parse_probe)

    def _checks_file(self, checks: list[dict]) -> Path:
        path = self.sandbox.project / f".probe-{os.urandom(4).hex()}.json"
        path.write_text(json.dumps(checks))
        return path

    def argv(self, checks: list[dict]) -> list[str]:
        return [PY, str(self.script), str(self._checks_file(checks))]

    def inside(self, checks: list[dict], *agentpen_args: str, env: dict | None = None,
               timeout: float = 60):
        """(results, Run): the checks run as the confined command."""
        r = self.sandbox.run(*agentpen_args, "--", *self.argv(checks), env=env, timeout=timeout)
        assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
        return parse_probe(r.stdout), r

    def host(self, checks: list[dict], env: dict | None = None, timeout: float = 60) -> dict:
        """The same checks, unconfined: the positive control."""
        p = subprocess.run(self.argv(checks), capture_output=True, text=True, timeout=timeout,
                           env=env or self.sandbox.env(), cwd=self.sandbox.project,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        return parse_probe(p.stdout)


@pytest.fixture
def prober(sandbox) -> Prober:
    script = sandbox.project / ".attack-probe.py"
    shutil.copy(PROBE, script)
    return Prober(sandbox, script)
