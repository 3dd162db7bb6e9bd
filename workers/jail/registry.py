"""The agent registry: agents.toml shipped in the package, extended or overridden
per agent by the user's config (`extra`, same shape as the TOML)."""

from __future__ import annotations

import os

from agentpen.core.policy import Mount
from agentpen.core.record import field, record

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any


class RegistryError(ValueError):
    """The registry data is malformed."""


@record(frozen=True)
class AgentSpec:
    name: str
    commands: tuple[str, ...]
    hosts: tuple[str, ...]
    env: tuple[str, ...]
    mounts: tuple[Mount, ...] = field(default_factory=tuple)  # paths keep their "~/"

    def home_mounts(self, home: str) -> list[Mount]:
        """Mounts with ~ expanded to the given home."""
        return [
            Mount(os.path.join(home, m.path[2:]) if m.path.startswith("~/") else m.path,
                  m.mode, m.why)
            for m in self.mounts
        ]


def _str_list(name: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise RegistryError(f"agent {name}: {key} must be a list of non-empty strings")
    return tuple(value)


def _spec(name: str, d: Any) -> AgentSpec:
    if not isinstance(d, dict):
        raise RegistryError(f"agent {name}: must be a table")
    unknown = set(d) - {"commands", "hosts", "env", "mounts"}
    if unknown:
        raise RegistryError(f"agent {name}: unknown keys {sorted(unknown)}")
    mounts = []
    for m in d.get("mounts", []):
        if not isinstance(m, dict) or not isinstance(m.get("path"), str):
            raise RegistryError(f"agent {name}: each mount needs a path")
        path, mode = m["path"], m.get("mode", "ro")
        if mode not in ("ro", "rw"):
            raise RegistryError(f"agent {name}: mount {path}: mode must be ro or rw")
        if not path.startswith("~/") or ".." in path.split("/") or path.rstrip("/") == "~":
            raise RegistryError(f"agent {name}: mount {path}: must be ~/something without ..")
        mounts.append(Mount(path, mode, str(m.get("why", ""))))
    return AgentSpec(
        name=name,
        commands=_str_list(name, "commands", d.get("commands", [name])),
        hosts=_str_list(name, "hosts", d.get("hosts", [])),
        env=_str_list(name, "env", d.get("env", [])),
        mounts=tuple(mounts),
    )


def load_registry(extra: dict[str, Any] | None = None) -> dict[str, AgentSpec]:
    """Shipped agents, then `extra` (the config file's [agents.*] tables): a table
    for a known agent replaces the keys it names, a new name adds an agent."""
    # Beside this module (package data): importlib.resources would import pathlib and
    # zipfile on the start-up path for a file that is always a plain file here.
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "agents.toml"),
              encoding="utf-8") as f:
        import tomllib  # here: not on the path to pasta's start (cli imports this module)

        raw = tomllib.loads(f.read())
    for name, table in (extra or {}).items():
        if not isinstance(table, dict):
            raise RegistryError(f"agent {name}: must be a table")
        raw[name] = {**raw.get(name, {}), **table}
    return {name: _spec(name, d) for name, d in raw.items()}


def agent_for_command(name: str, registry: dict[str, AgentSpec] | None = None) -> str | None:
    base = os.path.basename(name)
    for spec in (registry or load_registry()).values():
        if base in spec.commands:
            return spec.name
    return None
