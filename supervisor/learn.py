"""Learn mode's two messages: the loud warning at the start and the summary at the end
(the names the profile would have blocked, and how to admit them)."""

from __future__ import annotations

import json
from typing import Any

from agentpen.core.events import make_event

WARNING = ("LEARN MODE: egress is OPEN. Every name resolves and the proxy lets TLS to any "
           "host through (recorded as would-block); filesystem, seccomp and the environment "
           "stay confined. Do not use learn mode with a repository you do not trust.")


def start_event(policy: Any) -> dict[str, Any]:
    return make_event(
        "learn-mode", WARNING, level="critical", category=["network", "configuration"],
        type=["change"], outcome="success", reason="--learn",
        agentpen={"learn": True, "allowlist": list(policy.allow), "profile": policy.profile},
    )


def _toml_list(names: list[str]) -> str:
    return "[" + ", ".join(json.dumps(n) for n in names) + "]"


def summary(learned: dict[str, int], agent: str | None, config_path: str | None) -> str:
    """Human text: what would have been blocked, as flags and as config lines."""
    if not learned:
        return ("learn mode: no connection went to a name outside the allowlist; "
                "the profile as it stands would have let everything through")
    names = sorted(learned)
    width = max(len(n) for n in names)
    lines = [f"learn mode: {len(names)} name(s) contacted that the profile would have blocked:"]
    for n in names:
        lines.append(f"  {n.ljust(width)}  {learned[n]} connection(s)")
    lines.append("")
    lines.append("to allow them on the command line:")
    lines.append("  " + " ".join(f"--allow {n}" for n in names))
    where = config_path or "$XDG_CONFIG_HOME/agentpen/config.toml"
    lines.append(f"or in {where}:")
    if agent:
        lines.append(f"  [agents.{agent}]")
        lines.append(f"  add_hosts = {_toml_list(names)}")
    else:
        lines.append("  [defaults]")
        lines.append(f"  allow = {_toml_list(names)}")
    return "\n".join(lines)
