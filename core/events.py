"""Events as workers build them, before the supervisor stamps them.

A worker sends a body of this shape over its channel (MsgType.EVENT)::

    {"action": "connection-allowed", "level": "info", "message": "...",
     "event": {"category": [...], "type": [...], "outcome": "...", "reason": "..."},
     "destination": {...}, "tls": {...}, "agentpen": {...}, ...}

Nested keys are Elastic Common Schema field sets. The supervisor adds what a
worker must not be trusted with: ``@timestamp``, ``event.sequence``, ``event.id``,
``labels.session_id``, ``ecs.version`` and the sender's pid (from SCM_CREDENTIALS).
Attacker-controlled strings only ever travel as JSON values.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")

# ECS top-level field sets a worker may fill. Anything else goes under "agentpen".
ECS_FIELDSETS = frozenset(
    {"event", "destination", "source", "tls", "process", "rule", "error", "dns", "network", "url"}
)


def make_event(
    action: str,
    message: str,
    *,
    level: str = "info",
    kind: str = "event",
    category: list[str] | None = None,
    type: list[str] | None = None,
    outcome: str | None = None,
    reason: str | None = None,
    **fieldsets: Any,
) -> dict[str, Any]:
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    event: dict[str, Any] = {"kind": kind}
    if category:
        event["category"] = list(category)
    if type:
        event["type"] = list(type)
    if outcome:
        event["outcome"] = outcome
    if reason:
        event["reason"] = reason
    body: dict[str, Any] = {"action": action, "level": level, "message": message, "event": event}
    for key, value in fieldsets.items():
        if value is None:
            continue
        if key == "event":
            event.update(value)
        elif key in ECS_FIELDSETS:
            body[key] = value
        elif key == "agentpen":
            body.setdefault("agentpen", {}).update(value)
        else:
            raise ValueError(f"{key!r} is not an ECS field set; put it under agentpen=")
    return body
