"""agentpen's own messages on stderr, through structlog: a console renderer on a
terminal, JSON lines (ECS-shaped like the audit stream) with --log-format json.

structlog is imported at the first line actually printed, not before: with asyncio
(which its stdlib module pulls in) it costs 30-60 ms here, which the path to the
agent's first instruction should not pay (issue 10). A session's console is created
*holding*: its info and debug lines from before the command starts (where the audit
log goes, the config file) are kept, with the time they were logged, and printed by
``release()`` as soon as the command has been started; a warning or an error is
printed at once, after whatever is held, so the order never changes.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime

from .ecs import ECS_VERSION

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import IO, Any

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


def timestamper(fmt: str, *, utc: bool):
    """structlog's TimeStamper, but a held line keeps the time it was logged (``_at``)."""

    def stamp(_logger: Any, _name: str, ed: dict[str, Any]) -> dict[str, Any]:
        at = ed.pop("_at", None) or time.time()
        when = datetime.fromtimestamp(at, UTC) if utc else datetime.fromtimestamp(at)
        iso = fmt == "iso"
        ed["timestamp"] = when.replace(tzinfo=None).isoformat() + "Z" if iso else when.strftime(fmt)
        return ed

    return stamp


class Console:
    """The logger ``setup_console`` returns: ``debug/info/warning/error/critical(event,
    **fields)``, filtered by level, rendered by a structlog pipeline built on first use."""

    def __init__(self, fmt: str, level: str, out: IO[str], *, hold: bool) -> None:
        self.fmt, self.min, self.out = fmt, LEVEL_NUMBERS[level], out
        self._logger: Any = None
        self._held: list[tuple[str, str, dict[str, Any]]] | None = [] if hold else None

    def _structlog(self) -> Any:
        if self._logger is None:
            import structlog

            processors: list[Any] = [structlog.processors.add_log_level]
            if self.fmt == "json":
                processors += [
                    timestamper("iso", utc=True),
                    structlog.processors.format_exc_info,
                    to_ecs,
                    structlog.processors.JSONRenderer(serializer=_dumps),
                ]
            else:
                processors += [
                    timestamper("%H:%M:%S", utc=False),
                    escape_controls,
                    structlog.dev.ConsoleRenderer(colors=self.out.isatty()),
                ]
            self._logger = structlog.wrap_logger(
                structlog.WriteLogger(self.out),
                processors=processors,
                wrapper_class=structlog.make_filtering_bound_logger(self.min),
                cache_logger_on_first_use=False,
            )
        return self._logger

    def _log(self, method: str, event: str, fields: dict[str, Any]) -> None:
        number = LEVEL_NUMBERS[method]
        if number < self.min:
            return  # filtered: no structlog import for a quiet stderr
        if self._held is not None and number < LEVEL_NUMBERS["warning"]:
            self._held.append((method, event, {**fields, "_at": time.time()}))
            return
        self.release()
        getattr(self._structlog(), method)(event, **fields)

    def holding(self) -> bool:
        """Lines are held for ``release()`` (each of them will be printed)."""
        return bool(self._held)

    def release(self) -> None:
        """Print what is held, and hold nothing from now on."""
        held, self._held = self._held, None
        for method, event, fields in held or ():
            getattr(self._structlog(), method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._log("critical", event, fields)


def setup_console(fmt: str | None, level: str, *, stream: IO[str] | None = None,
                  hold: bool = False) -> Console:
    """The logger for agentpen's own stderr messages (not the audit stream). fmt None:
    console on a TTY, else JSON; "console" or "json" force one. ``hold``: keep info and
    debug lines until ``release()`` (a session, until its command has started)."""
    out = stream if stream is not None else sys.stderr
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    if fmt not in ("console", "json"):
        raise ValueError(f"log format {fmt!r}: console or json")
    if level not in LEVEL_NUMBERS:
        raise ValueError(f"log level {level!r}: one of {', '.join(LEVEL_NUMBERS)}")
    return Console(fmt, level, out, hold=hold)
