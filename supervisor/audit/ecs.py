"""Turning an event body into one ECS audit record: small processors in structlog's
shape ``(logger, method_name, event_dict) -> event_dict``, composed into a pipeline.

They do not import structlog (≈50 ms here) because the first audit line must be on
disk before the agent starts; they plug into ``structlog.wrap_logger(...,
processors=[...])`` unchanged all the same (tests/unit/test_audit_stream.py does).

A body is what ``core.events.make_event`` returns; it may come from a worker that
parses attacker bytes, so nothing in it is trusted: fields the supervisor stamps
cannot be set by a body, values of the wrong type or outside ECS's allowed values
are moved to ``agentpen.rejected`` (kept, never silently lost), and every string
stays a JSON value.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

    EventDict = dict[str, Any]
    Processor = Callable[[Any, str, EventDict], EventDict]

ECS_VERSION = "8.11.0"
SCHEMA_VERSION = "1.0"  # major.minor: a minor adds fields, a major breaks readers

LEVELS = ("debug", "info", "warning", "error", "critical")
# ECS top-level field sets a body may fill (core/events.py), and the product namespace.
FIELDSETS = ("event", "destination", "source", "tls", "process", "rule", "error", "dns",
             "network", "url")

EVENT_KINDS = frozenset({"alert", "asset", "enrichment", "event", "metric", "state",
                         "pipeline_error", "signal"})
EVENT_CATEGORIES = frozenset({"api", "authentication", "configuration", "database", "driver",
                              "email", "file", "host", "iam", "intrusion_detection", "library",
                              "malware", "network", "package", "process", "registry", "session",
                              "threat", "vulnerability", "web"})
EVENT_TYPES = frozenset({"access", "admin", "allowed", "change", "connection", "creation",
                         "deletion", "denied", "end", "error", "group", "indicator", "info",
                         "installation", "protocol", "start", "user"})
EVENT_OUTCOMES = frozenset({"failure", "success", "unknown"})

# Fields the supervisor stamps: a body's value for them is moved to agentpen.rejected.
STAMPED_EVENT = ("sequence", "id", "ingested")
STAMPED_AGENTPEN = ("schema_version", "worker", "worker_pid", "chain", "rejected")

# Integer ECS fields: (field set, key) -> (min, max).
_U64 = (0, 2**64 - 1)
INT_FIELDS: dict[tuple[str, str], tuple[int, int]] = {
    ("event", "duration"): _U64,
    ("event", "severity"): _U64,
    ("destination", "port"): (0, 65535),
    ("source", "port"): (0, 65535),
    ("destination", "bytes"): _U64,
    ("source", "bytes"): _U64,
    ("destination", "packets"): _U64,
    ("source", "packets"): _U64,
    ("process", "pid"): (0, 2**31 - 1),
    ("process", "exit_code"): (-(2**31), 2**31 - 1),
}

DURABLE_ACTIONS = frozenset({"session-started", "session-ended", "worker-exited",
                             "worker-restarted", "audit-gap"})



def _reject(ed: EventDict, key: str, value: Any) -> None:
    ed.setdefault("_rejected", {})[key] = value


def normalize_body(_logger: Any, _name: str, ed: EventDict) -> EventDict:
    """Shape a body into ECS: ``action`` -> event.action, ``level`` -> log.level; keep
    known field sets (copied, so the caller's dict is never changed), reject the rest."""
    out: EventDict = {}
    rejected: dict[str, Any] = {}
    for key, value in ed.items():
        if key in ("action", "level", "message"):
            continue
        if key in FIELDSETS or key == "agentpen":
            if isinstance(value, dict):
                out[key] = dict(value)
            else:
                rejected[key] = value
        elif key == "_stamp":
            out[key] = value
        else:
            rejected[key] = value  # @timestamp, ecs, labels, log... are the supervisor's
    action = ed.get("action")
    if not isinstance(action, str) or not action:
        if "action" in ed:
            rejected["action"] = action
        action = "invalid-event"
    level = ed.get("level", "info")
    if level not in LEVELS:
        rejected["level"] = level
        level = "warning"
    message = ed.get("message")
    if not isinstance(message, str):
        if "message" in ed:
            rejected["message"] = message
        message = action
    event = out.pop("event", {})
    for key in STAMPED_EVENT:
        if key in event:
            rejected[f"event.{key}"] = event.pop(key)
    if "action" in event and event["action"] != action:
        rejected["event.action"] = event["action"]
    event.pop("action", None)
    agentpen = out.pop("agentpen", {})
    for key in STAMPED_AGENTPEN:
        if key in agentpen:
            rejected[f"agentpen.{key}"] = agentpen.pop(key)
    record: EventDict = {"log": {"level": level}, "message": message,
                         "event": {"action": action, **event}}
    record.update(out)
    if agentpen:
        record["agentpen"] = agentpen
    if rejected:
        record["_rejected"] = rejected
    return record


def _valid_enum(value: Any, allowed: frozenset[str]) -> bool:
    return isinstance(value, str) and value in allowed


def _valid_list(value: list[Any], allowed: frozenset[str]) -> bool:
    return bool(value) and all(type(v) is str for v in value) and allowed.issuperset(value)


_INT_BY_FIELDSET: dict[str, list[tuple[str, int, int]]] = {}
for (_fs, _key), (_low, _high) in INT_FIELDS.items():
    _INT_BY_FIELDSET.setdefault(_fs, []).append((_key, _low, _high))


def check_types(_logger: Any, _name: str, ed: EventDict) -> EventDict:
    """Keep ECS-typed fields to their types and allowed values, so every written line
    validates against supervisor/audit-schema.json; move offenders to agentpen.rejected."""
    event = ed["event"]
    kind = event.get("kind", "event")
    if not _valid_enum(kind, EVENT_KINDS):
        _reject(ed, "event.kind", kind)
        kind = "event"
    event["kind"] = kind
    for key, allowed in (("category", EVENT_CATEGORIES), ("type", EVENT_TYPES)):
        if key not in event:
            continue
        value = event[key]
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and _valid_list(value, allowed):
            event[key] = value
        else:
            _reject(ed, f"event.{key}", event.pop(key))
    if "outcome" in event and not _valid_enum(event["outcome"], EVENT_OUTCOMES):
        _reject(ed, "event.outcome", event.pop("outcome"))
    if ("denied" in event.get("type", ()) and "outcome" in event
            and event["outcome"] != "success"):
        # ECS: a block is the control succeeding; another outcome is kept aside.
        _reject(ed, "event.outcome", event.pop("outcome"))
    for key in ("reason", "provider", "module", "dataset", "original", "code"):
        if key in event and not isinstance(event[key], str):
            _reject(ed, f"event.{key}", event.pop(key))
    for fieldset, specs in _INT_BY_FIELDSET.items():
        holder = ed.get(fieldset)
        if not holder:
            continue
        for key, low, high in specs:
            if key in holder:
                value = holder[key]
                if type(value) is not int or not low <= value <= high:  # bool is not an int here
                    _reject(ed, f"{fieldset}.{key}", holder.pop(key))
    return ed


def stamp(_logger: Any, _name: str, ed: EventDict) -> EventDict:
    """Add what only the supervisor knows; runs after the body's keys are settled, so
    nothing a body said can win. ``_stamp`` carries (session, sequence, sender, pid,
    wall clock ns); pid is the sender's as the kernel saw it (SCM_CREDENTIALS)."""
    session_id, sequence, sender, pid, wall_ns = ed.pop("_stamp")
    seconds, ns = divmod(wall_ns, 1_000_000_000)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns // 1000:06d}Z"
    event = ed["event"]
    event["sequence"] = sequence
    event["id"] = os.urandom(16).hex()  # 128 random bits; uuid costs 4 ms of imports
    if pid is not None and "process" not in ed:
        # No process field set: the event is about its sender. One that has it
        # describes another process (pasta, the command), which the sender's pid
        # must not overwrite; agentpen.worker_pid always says who sent it.
        ed["process"] = {"pid": pid}
    agentpen = ed.pop("agentpen", {})
    agentpen["schema_version"] = SCHEMA_VERSION
    agentpen["worker"] = sender
    if pid is not None:
        agentpen["worker_pid"] = pid
    rejected = ed.pop("_rejected", None)
    if rejected:
        agentpen["rejected"] = rejected
    # @timestamp first: people read these files too.
    record: EventDict = {"@timestamp": ts, "log": ed.pop("log"), "message": ed.pop("message"),
                         "ecs": {"version": ECS_VERSION}, "event": ed.pop("event"),
                         "labels": {"session_id": session_id}}
    record.update(ed)
    record["agentpen"] = agentpen
    return record


PIPELINE: tuple[Processor, ...] = (normalize_body, check_types, stamp)


def run_pipeline(processors: Iterable[Processor], ed: EventDict) -> EventDict:
    for proc in processors:
        ed = proc(None, "emit", ed)
    return ed


def build_record(body: dict[str, Any], *, session_id: str, sequence: int, sender: str,
                 pid: int | None, wall_ns: int | None = None) -> EventDict:
    """One stamped ECS record (a new dict; `body` is left as it was)."""
    if not isinstance(body, dict):
        body = {"action": "invalid-event", "level": "warning",
                "message": "an event body that was not a JSON object",
                "agentpen": {"rejected": {"body": body}}}
    ed = dict(body)
    ed["_stamp"] = (session_id, sequence, sender, pid,
                    time.time_ns() if wall_ns is None else wall_ns)
    return run_pipeline(PIPELINE, ed)


def is_durable(record: EventDict) -> bool:
    """Events that are fsynced at once: session start/end, blocks, worker exits, errors."""
    event = record["event"]
    return (event["action"] in DURABLE_ACTIONS
            or "denied" in event.get("type", ())
            or record["log"]["level"] in ("error", "critical"))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # NaN/Infinity are not JSON; keep them visible as strings
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _skeleton(record: EventDict, why: str) -> EventDict:
    """The stamped fields alone, for a record whose body cannot be serialised."""
    agentpen = record["agentpen"]
    return {"@timestamp": record["@timestamp"], "log": record["log"],
            "message": "an event that could not be serialised", "ecs": record["ecs"],
            "event": {k: record["event"][k] for k in ("action", "kind", "sequence", "id")},
            "labels": record["labels"],
            "agentpen": {"schema_version": agentpen["schema_version"],
                         "worker": agentpen["worker"], "rejected": {"body": why},
                         **({"worker_pid": agentpen["worker_pid"]}
                            if "worker_pid" in agentpen else {}),
                         **({"chain": agentpen["chain"]} if "chain" in agentpen else {})}}


def _dumps(record: EventDict, ascii_only: bool) -> str:
    return json.dumps(record, ensure_ascii=ascii_only, separators=(",", ":"), allow_nan=False)


def render(record: EventDict) -> bytes:
    """One JSON line, newline included. UTF-8 where it can be; a lone surrogate (JSON
    from a worker can carry one) falls back to ASCII escapes rather than failing."""
    try:
        try:
            text = _dumps(record, False)
        except ValueError:  # NaN or Infinity somewhere
            record = _finite(record)
            text = _dumps(record, False)
        try:
            return text.encode() + b"\n"
        except UnicodeEncodeError:
            return _dumps(record, True).encode() + b"\n"
    except RecursionError:
        return _dumps(_skeleton(record, "too deeply nested"), True).encode() + b"\n"
