"""Small stand-ins that keep heavy modules off the start-up path (issue 10): each must
answer exactly what the module it replaces would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid

from agentpen.core.digest import sha256
from agentpen.core.which import which
from agentpen.supervisor.resolve import uuid4


def test_which_finds_what_shutil_finds(tmp_path, monkeypatch):
    bin_a, bin_b, nox = tmp_path / "a", tmp_path / "b", tmp_path / "nox"
    for d in (bin_a, bin_b, nox):
        d.mkdir()
    for d, name, mode in ((bin_a, "tool", 0o755), (bin_b, "tool", 0o755), (nox, "tool", 0o644),
                          (bin_b, "only-b", 0o755)):
        (d / name).write_text("#!/bin/sh\n")
        (d / name).chmod(mode)
    (bin_a / "adir").mkdir(mode=0o755)  # a directory is never the answer
    path = os.pathsep.join(map(str, (nox, bin_a, bin_b)))
    for name in ("tool", "only-b", "adir", "missing", "sh", str(bin_b / "tool"), str(nox / "tool")):
        assert which(name, path=path) == shutil.which(name, path=path), name
    for odd in ("", os.pathsep + str(bin_b), str(bin_a) + os.pathsep + str(bin_a)):
        assert which("tool", path=odd) == shutil.which("tool", path=odd), odd
    monkeypatch.chdir(bin_b)
    assert which("only-b", path=os.pathsep) == shutil.which("only-b", path=os.pathsep) == "only-b"
    monkeypatch.setenv("PATH", path)
    assert which("tool") == shutil.which("tool") == str(bin_a / "tool")
    assert which("sh", path="/usr/bin:/bin") == shutil.which("sh", path="/usr/bin:/bin") is not None


def test_uuid4_is_a_random_version_4_uuid():
    seen = {uuid4() for _ in range(200)}
    assert len(seen) == 200
    for text in seen:
        u = uuid.UUID(text)
        assert str(u) == text and u.version == 4 and u.variant == uuid.RFC_4122
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", text)


def _loaded_after(modules: list[str], watched: list[str], *, also: str = "") -> list[str]:
    """Which of ``watched`` a fresh interpreter holds after importing ``modules`` (and
    ``also``, a control's extra import)."""
    code = (f"import sys, os{also}; import {', '.join(modules)}; "
            "import agentpen.supervisor.config as c; c.config_path(os.environ); "
            f"print(' '.join(m for m in {watched!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_early_path_imports_none_of_the_heavy_modules():
    """What the CLI imports before pasta starts (probe, the early spawn's modules) and
    the supervisor's session path must not bring these back (each costs 2-3 ms of every
    start on a small machine); the control shows the check sees an import."""
    modules = [f"agentpen.{m}" for m in (
        "supervisor.cli", "workers.netns.probe", "supervisor.workers", "supervisor.guardian",
        "supervisor.check", "supervisor.resolve", "supervisor.paranoid", "workers.jail.protect",
        "workers.jail.seccomp", "workers.jail.layout", "workers.netns.main", "workers.netns.dns",
        "supervisor.session", "workers.proxy.allowlist")]
    heavy = ["shutil", "uuid", "platform", "tempfile", "secrets", "dnslib", "traceback", "_hashlib",
             "dataclasses", "inspect"]
    assert _loaded_after(modules, heavy) == []
    assert _loaded_after(modules, heavy, also=", uuid") == ["uuid", "platform"]  # the control


def test_sha256_is_hashlibs():
    import hashlib

    for data in (b"", b"api.example.com\n*.example.org", bytes(range(256)) * 100):
        assert sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()


def test_what_cli_imports_before_pasta_starts_holds_neither_typing_nor_tomllib():
    """The modules the CLI and the forked netns worker need before the sandbox's command
    starts (cli._early_network, workers/netns/main.forked_main) import neither typing nor
    tomllib (~6 ms together): annotations stay strings, TYPE_CHECKING blocks import typing
    for the type checker only, and TOML is parsed where a file is read."""
    modules = [f"agentpen.{m}" for m in (
        "supervisor.cli", "workers.netns.probe", "supervisor.config", "core.policy",
        "supervisor.workers", "supervisor.guardian", "workers.netns.pasta", "workers.netns.join",
        "workers.netns.main", "workers.jail.launch", "workers.netns.dns", "workers.netns.nftables",
        "workers.netns.verify", "workers.netns.fds", "workers.netns.listeners",
        "workers.jail.registry", "core.events")]
    assert _loaded_after(modules, ["typing", "tomllib"]) == []
    assert _loaded_after(modules, ["typing", "tomllib"], also=", tomllib") == ["typing", "tomllib"]
