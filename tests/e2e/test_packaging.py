"""Issue 2: `pip install .` and `pip install -e .` both give a working `agentpen` command,
and no bare `supervisor`, `workers` or `core` package lands in site-packages."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


SKIP_DIRS = {".git", ".venv", "__pycache__", "build", "dist", ".pytest_cache", ".ruff_cache",
             ".hypothesis", "results"}


def _copy_repo(dst: Path) -> Path:
    """A clean copy of the source (a build writes egg-info into its source tree)."""
    for src in REPO.rglob("*"):
        rel = src.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if src.is_file() and not src.is_symlink():
            out = dst / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes())
    return dst


def _venv(path: Path) -> Path:
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(path)], check=True, timeout=120)
    # Dependencies come from the test environment (no network needed for this test).
    site = Path(subprocess.run([str(path / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "outer-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_install_gives_a_working_console_command(tmp_path, editable):
    src = _copy_repo(tmp_path / "src")
    venv = _venv(tmp_path / "venv")
    args = ["-e", str(src)] if editable else [str(src)]
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-build-isolation",
                    *args], check=True, timeout=300)
    out = subprocess.run([str(venv / "bin" / "agentpen"), "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("agentpen ")
    # The imports resolve under the one namespace, from this install.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import agentpen.supervisor.cli as c, agentpen.workers.proxy.clienthello as h, "
         "agentpen.supervisor.audit as a; print(c.__file__); print(a.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for bare in ("supervisor", "workers", "core"):
        assert not (site / bare).exists(), f"a bare {bare!r} package was installed"
    if editable:
        assert str(src) in where.stdout
    else:
        assert str(site / "agentpen") in where.stdout
        assert (site / "agentpen" / "workers" / "jail" / "agents.toml").is_file()
        assert (site / "agentpen" / "supervisor" / "audit-schema.json").is_file()
