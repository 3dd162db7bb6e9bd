"""The audit stream (docs/audit.md): ECS JSON lines, one per security-relevant fact,
written by the supervisor alone to a file, a descriptor or journald.

Cheap to import: no structlog here (see console.py, loaded by setup_console).
"""

from __future__ import annotations

from .ecs import ECS_VERSION, SCHEMA_VERSION, build_record, render
from .sinks import (
    AuditSinkError,
    FdSink,
    FileSink,
    JournaldSink,
    Sink,
    default_audit_path,
    open_sinks,
    sink_paths,
)
from .stream import AuditHalt, AuditState, AuditStream, genesis_hash

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any


def __getattr__(name: str) -> Any:
    # verify is a separate command: keep its module off the session's import path.
    if name in ("VerifyResult", "audit_verify_main", "verify_chain", "verify_lines"):
        from . import chain

        return getattr(chain, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def setup_console(fmt: str | None, level: str, **kwargs: Any) -> Any:
    """See console.setup_console; imported on first use to keep structlog off the
    start-up path."""
    from .console import setup_console as _setup

    return _setup(fmt, level, **kwargs)


__all__ = [
    "ECS_VERSION",
    "SCHEMA_VERSION",
    "AuditHalt",
    "AuditSinkError",
    "AuditState",
    "AuditStream",
    "FdSink",
    "FileSink",
    "JournaldSink",
    "Sink",
    "VerifyResult",
    "audit_verify_main",
    "build_record",
    "default_audit_path",
    "genesis_hash",
    "open_sinks",
    "render",
    "setup_console",
    "sink_paths",
    "verify_chain",
    "verify_lines",
]
