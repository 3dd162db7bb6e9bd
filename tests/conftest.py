"""Shared test fixtures. The `sandbox` fixture drives the real agentpen, bwrap, pasta
and nft, as an unprivileged user (tests under e2e/ and adversarial/); helpers live in
tests/harness.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import AGENTPEN, Run, Sandbox, TlsUpstream, leftover_processes

__all__ = ["AGENTPEN", "Run", "Sandbox", "TlsUpstream", "leftover_processes"]


def pytest_collection_modifyitems(items):
    for item in items:
        if any(f"/{d}/" in str(item.fspath) for d in ("e2e", "adversarial", "agents")):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _unprivileged_with_tools(request):
    if "e2e" not in request.keywords:
        return
    if os.geteuid() == 0:
        pytest.fail("end-to-end tests must run as an unprivileged user (pasta refuses root); "
                    "see README: run the test command as your normal user, or .ci/run as root")
    missing = [t for t in ("bwrap", "pasta", "nft") if not (
        shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    if missing:
        pytest.fail(f"missing tools for end-to-end tests: {missing} "
                    "(apt-get install bubblewrap passt nftables)")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY----- secret\n")
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key=SECRET\n")
    (home / ".bashrc").write_text("# original rc\n")
    project = home / "src" / "project"
    project.mkdir(parents=True)
    (project / "README").write_text("project file\n")
    sibling = home / "src" / "sibling"
    sibling.mkdir()
    (sibling / "private.txt").write_text("sibling secret\n")
    state = tmp_path / "state"
    box = Sandbox(tmp_path, home, project, sibling, state)
    yield box
    box.kill_leftover_sessions()


@pytest.fixture
def upstream(tmp_path: Path):
    u = TlsUpstream(tmp_path)
    yield u
    u.close()
