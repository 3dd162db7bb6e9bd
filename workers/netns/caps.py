"""Proof that a process holds no capability at all, from /proc/self/status."""

from __future__ import annotations

from agentpen.core.osutil import capability_sets, drop_all_capabilities
from agentpen.workers.netns.errors import NetnsSetupError

# Every set that could give a capability now or after an exec.
CHECKED = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def assert_no_capabilities(pid: int | str = "self") -> dict[str, str]:
    """Raise unless every capability set is empty; return them (hex) for the audit."""
    sets = capability_sets(pid)
    missing = [k for k in CHECKED if k not in sets]
    held = {k: v for k, v in sets.items() if k in CHECKED and v}
    if missing or held:
        raise NetnsSetupError(
            f"capabilities still held after the drop: {held or 'unknown'}"
            + (f" (missing from /proc: {missing})" if missing else ""),
            "this is a bug or an unexpected kernel; the session must not start",
        )
    return {k: f"{v:016x}" for k, v in sets.items() if k in CHECKED}


def drop_and_prove() -> dict[str, str]:
    """Drop every capability (core.osutil) and prove it."""
    try:
        drop_all_capabilities()
    except OSError as exc:
        raise NetnsSetupError(f"dropping capabilities failed: {exc}",
                              "this is a bug or an unexpected kernel") from exc
    return assert_no_capabilities()
