"""core.osutil.import_pyseccomp: pyseccomp without ldconfig forks at import."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import ctypes.util, subprocess, sys
def no_fork(*a, **k):
    raise AssertionError(f"forked {a[0]!r}")
subprocess.Popen = no_fork
from agentpen.core import osutil
{setup}
sc = osutil.import_pyseccomp()
f = sc.SyscallFilter(sc.ALLOW)
f.add_rule(sc.ERRNO(1), "ptrace")
assert ctypes.util.find_library.__module__ == "ctypes.util"  # restored
print("ok")
"""


def _run(setup: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT.replace("{setup}", setup)], capture_output=True,
                          text=True, timeout=60)


def test_pyseccomp_loads_without_running_ldconfig():
    r = _run("")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_control_an_unknown_soname_falls_back_to_find_library_which_forks():
    """The probe can fail: with the known name made wrong, the real find_library runs
    (and forks ldconfig, which the script forbids)."""
    r = _run('osutil.KNOWN_SONAMES["seccomp"] = "libseccomp.so.999"')
    assert r.returncode != 0 and "forked" in r.stderr, (r.stdout, r.stderr)
