"""The brief's convention, enforced: the whole tree is ruff clean (config in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is part of the test extras: pip install -e '.[test]'")
    p = subprocess.run([ruff, "check", "--no-cache", str(REPO)], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
