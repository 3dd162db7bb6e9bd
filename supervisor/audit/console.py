"""agentpen's own messages on stderr, through structlog: a console renderer on a
terminal, JSON lines (ECS-shaped like the audit stream) with --log-format json.

structlog is imported here, not in the package's __init__: it costs ≈50 ms, which
the path to the agent's first instruction should not pay when stderr is quiet.
"""

from __future__ import annotations

import json
import re
import sys
from typing import IO, Any

from .ecs import ECS_VERSION

LEVEL_NUMBERS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# C0/C1 controls and DEL: a host name or argv from the sandbox must not drive the
# user's terminal (colours, cursor moves, title changes) when printed.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escape(text: str) -> str:
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def escape_controls(_logger: Any, _name: str, ed: dict[str, Any]) -> dict[str, Any]:
    """Console only: show control characters in string values as \\xNN escapes."""
    for key, value in ed.items():
        if isinstance(value, str) and key != "exception":
            ed[key] = _escape(value)
    return ed


def to_ecs(_logger: Any, _name: str, ed: dict[str, Any]) -> dict[str, Any]:
    """JSON only: structlog's {event, level, timestamp, ...} -> ECS's
    {@timestamp, log.level, message, ecs.version, agentpen.*}."""
    out: dict[str, Any] = {"@timestamp": ed.pop("timestamp"), "log": {"level": ed.pop("level")},
                           "message": str(ed.pop("event", "")), "ecs": {"version": ECS_VERSION}}
    exc = ed.pop("exception", None)
    if exc:
        out["error"] = {"stack_trace": exc}
    if ed:
        out["agentpen"] = ed
    return out


def _dumps(obj: Any, **_kw: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=repr)


def setup_console(fmt: str | None, level: str, *, stream: IO[str] | None = None) -> Any:
    """A structlog bound logger for agentpen's own stderr messages (not the audit
    stream). fmt None: console on a TTY, else JSON; "console" or "json" force one."""
    import structlog

    out = stream if stream is not None else sys.stderr
    tty = out.isatty()
    if fmt is None:
        fmt = "console" if tty else "json"
    if fmt not in ("console", "json"):
        raise ValueError(f"log format {fmt!r}: console or json")
    if level not in LEVEL_NUMBERS:
        raise ValueError(f"log level {level!r}: one of {', '.join(LEVEL_NUMBERS)}")
    processors: list[Any] = [structlog.processors.add_log_level]
    if fmt == "json":
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            to_ecs,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            escape_controls,
            structlog.dev.ConsoleRenderer(colors=tty),
        ]
    return structlog.wrap_logger(
        structlog.WriteLogger(out),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVEL_NUMBERS[level]),
        cache_logger_on_first_use=False,
    )
