"""The user's config file: `$XDG_CONFIG_HOME/agentpen/config.toml` (default
`~/.config/agentpen/config.toml`). Optional; project-independent.

Precedence: command line > config file > built-in. Lists (allow, env, mount, ...) add up:
the config's entries, then the profile's, then the command line's. Scalars (log_level,
audit_failure, ...) are taken from the command line when given there, else from the
selected profile, else from [defaults], else built-in.

    [defaults]                      # any key of OPTION_KEYS
    allow = ["pypi.org"]
    env = ["HTTPS_PROXY_CA"]

    [agents.claude]                 # override (replace) or add to a shipped agent
    add_hosts = ["mcp.internal.example"]
    add_env = ["MY_TOKEN"]
    add_mounts = [{ path = "~/.claude-extra", mode = "ro", why = "shared prompts" }]
    # hosts / env / mounts / commands replace the shipped lists instead

    [agents.mytool]                 # a new agent
    commands = ["mytool"]
    hosts = ["api.mytool.dev"]

    [profiles.work]                 # `--profile work`: a built-in profile plus options
    base = "untrusted"
    allow = ["llm.corp"]

Every error names the file, the line and the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from agentpen.core.record import field, record
from agentpen.supervisor.errors import UsageError

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

BUILTIN_PROFILES = ("untrusted", "paranoid")

# key -> (Options attribute, kind). "list" keys add up; the others replace.
OPTION_KEYS: dict[str, tuple[str, str]] = {
    "allow": ("allow", "list"),
    "upstream": ("upstream", "list"),
    "env": ("env", "list"),
    "mount": ("mount", "list"),
    "mount_rw": ("mount_rw", "list"),
    "protect": ("protect", "list"),
    "unprotect": ("unprotect", "list"),
    "publish": ("publish", "list"),
    "host_port": ("host_port", "list"),
    "log_format": ("log_format", "console|json"),
    "log_level": ("log_level", "debug|info|warning|error"),
    "audit_log": ("audit_log", "str"),
    "audit_failure": ("audit_failure", "halt|deny|continue"),
    "audit_chain": ("audit_chain", "bool"),
    "learn": ("learn", "bool"),
    "memory": ("memory", "str"),
    "max_procs": ("max_procs", "int"),
    "cpu_time": ("cpu_time", "str"),
    "wall_time": ("wall_time", "str"),
}
DEFAULT_ONLY_KEYS = {"profile"}  # [defaults] profile = "paranoid"
AGENT_KEYS = {"commands", "hosts", "env", "mounts", "add_hosts", "add_env", "add_mounts"}
PROFILE_KEYS = {"base", "description"}


class ConfigError(UsageError):
    """The config file is malformed: the message names file, line and key."""


@record
class Config:
    path: str | None = None  # None: no config file
    defaults: dict[str, Any] = field(default_factory=dict)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)  # raw agent tables (validated)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    text: str = ""

    def profile_names(self) -> tuple[str, ...]:
        return (*BUILTIN_PROFILES, *sorted(n for n in self.profiles if n not in BUILTIN_PROFILES))

    def base_profile(self, name: str) -> str:
        if name in BUILTIN_PROFILES:
            return name
        return str(self.profiles[name].get("base", "untrusted"))


def config_path(env: Mapping[str, str], home: str | None = None) -> str:
    base = env.get("XDG_CONFIG_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(home or env.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "agentpen", "config.toml")


# -- locating keys ------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEYLINE = re.compile(r'^\s*("(?:[^"\\]|\\.)*"|\'[^\']*\'|[A-Za-z0-9_.\-"\' ]+?)\s*=')


def _split_dotted(s: str) -> list[str]:
    parts, cur, quote = [], "", None
    for ch in s:
        if quote:
            if ch == quote:
                quote = None
            else:
                cur += ch
        elif ch in "\"'":
            quote = ch
        elif ch == ".":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def locate(text: str, path: list[str]) -> int | None:
    """1-based line of the key `path` (e.g. ["agents", "claude", "hosts"]) in TOML text:
    a `key =` line under the matching [table] header, a dotted key, or the table's own
    header. None when not found (the caller then names the key only)."""
    table: list[str] = []
    best: int | None = None
    for no, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m and not line.lstrip().startswith("#"):
            table = _split_dotted(m.group(1))
            if table == path:
                best = best or no
            continue
        k = _KEYLINE.match(line)
        if k:
            full = table + _split_dotted(k.group(1))
            if full == path:
                return no
            if best is None and len(full) < len(path) and full == path[: len(full)]:
                best = no  # an inline table holding the key
    if best is None and len(path) > 1:
        return locate(text, path[:-1])
    return best


# -- loading ---------------------------------------------------------------------------------


def load_config(env: Mapping[str, str], home: str | None = None, *, path: str | None = None) -> Config:
    path = path or config_path(env, home)
    try:
        with open(path, "rb") as f:
            raw_bytes = f.read()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not UTF-8 (byte {exc.start})") from None
    import tomllib  # only with a config file: off cli's path to pasta (issue 10)

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(f"config {path}: TOML syntax error: {exc}") from None
    return parse_config(data, path=path, text=text)


def parse_config(data: dict[str, Any], *, path: str, text: str) -> Config:
    def err(keypath: list[str], why: str) -> ConfigError:
        line = locate(text, keypath)
        where = f"{path}:{line}" if line else path
        return ConfigError(f"config {where}: key {'.'.join(keypath)}: {why}")

    cfg = Config(path=path, text=text)
    for top in data:
        if top not in ("defaults", "agents", "profiles"):
            raise err([top], "unknown section (known: defaults, agents, profiles)")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise err(["defaults"], "must be a table")
    cfg.defaults = _options_table(defaults, ["defaults"], err, allow_profile=True)

    agents = data.get("agents", {})
    if not isinstance(agents, dict):
        raise err(["agents"], "must be a table of agent tables")
    for name, table in agents.items():
        cfg.agents[name] = _agent_table(name, table, err)

    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise err(["profiles"], "must be a table of profile tables")
    for name, table in profiles.items():
        kp = ["profiles", name]
        if name in BUILTIN_PROFILES:
            raise err(kp, f"{name} is a built-in profile; name yours differently "
                          f"and set base = \"{name}\"")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise err(kp, "a profile name is letters, digits, '_', '.', '-'")
        if not isinstance(table, dict):
            raise err(kp, "must be a table")
        base = table.get("base", "untrusted")
        if base not in BUILTIN_PROFILES:
            raise err([*kp, "base"], f"must be one of {', '.join(BUILTIN_PROFILES)}, not {base!r}")
        desc = table.get("description", "")
        if not isinstance(desc, str):
            raise err([*kp, "description"], "must be a string")
        opts = _options_table({k: v for k, v in table.items() if k not in PROFILE_KEYS}, kp, err)
        cfg.profiles[name] = {"base": base, "description": desc, **opts}
    if "profile" in cfg.defaults and cfg.defaults["profile"] not in cfg.profile_names():
        raise err(["defaults", "profile"], f"unknown profile {cfg.defaults['profile']!r} "
                  f"(known: {', '.join(cfg.profile_names())})")
    return cfg


def _options_table(table: dict[str, Any], kp: list[str], err, *,
                   allow_profile: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        here = [*kp, key]
        if key == "profile" and allow_profile:
            if not isinstance(value, str):
                raise err(here, "must be a string")
            out[key] = value
            continue
        if key not in OPTION_KEYS:
            known = ", ".join(sorted(OPTION_KEYS) + (["profile"] if allow_profile else []))
            raise err(here, f"unknown key (known: {known})")
        _, kind = OPTION_KEYS[key]
        if kind == "list":
            if isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                               for x in value) and key in ("host_port", "publish"):
                value = [str(x) for x in value]
            if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
                raise err(here, "must be a list of non-empty strings")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise err(here, "must be true or false")
        elif kind == "int":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise err(here, "must be a positive integer")
        elif kind == "str":
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value:
                raise err(here, "must be a non-empty string")
        else:
            choices = kind.split("|")
            if value not in choices:
                raise err(here, f"must be one of {', '.join(choices)}, not {value!r}")
        out[key] = value
    return out


def _agent_table(name: str, table: Any, err) -> dict[str, Any]:
    kp = ["agents", name]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise err(kp, "an agent name is letters, digits, '_', '.', '-'")
    if not isinstance(table, dict):
        raise err(kp, "must be a table")
    for key, value in table.items():
        here = [*kp, key]
        if key not in AGENT_KEYS:
            raise err(here, f"unknown key (known: {', '.join(sorted(AGENT_KEYS))})")
        if key in ("mounts", "add_mounts"):
            if not isinstance(value, list):
                raise err(here, "must be a list of { path = \"~/...\", mode = \"ro\"|\"rw\", why = \"...\" }")
            for m in value:
                if not isinstance(m, dict) or not isinstance(m.get("path"), str):
                    raise err(here, "each mount is a table with a path")
                unknown = set(m) - {"path", "mode", "why"}
                if unknown:
                    raise err(here, f"mount {m['path']}: unknown keys {sorted(unknown)}")
                p = m["path"]
                if not p.startswith("~/") or ".." in p.split("/") or p.rstrip("/") == "~":
                    raise err(here, f"mount {p}: must be ~/something without ..")
                if m.get("mode", "ro") not in ("ro", "rw"):
                    raise err(here, f"mount {p}: mode must be ro or rw")
                if not isinstance(m.get("why", ""), str):
                    raise err(here, f"mount {p}: why must be a string")
        elif not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            raise err(here, "must be a list of non-empty strings")
        if key in ("hosts", "add_hosts"):
            from agentpen.workers.proxy.allowlist import normalize_allow_entry

            for h in value:
                try:
                    normalize_allow_entry(h)
                except ValueError as exc:
                    raise err(here, f"{h!r}: {exc}") from None
        if key in ("env", "add_env"):
            for v in value:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
                    raise err(here, f"{v!r} is not a variable name")
    return dict(table)


def registry_extra(cfg: Config) -> dict[str, dict[str, Any]]:
    """The [agents.*] tables in the shape registry.load_registry(extra=...) merges:
    add_* keys become the shipped list plus the additions."""
    if not cfg.agents:
        return {}
    from agentpen.workers.jail.registry import load_registry

    shipped = load_registry()
    out: dict[str, dict[str, Any]] = {}
    for name, table in cfg.agents.items():
        base = shipped.get(name)
        t = {k: v for k, v in table.items() if not k.startswith("add_")}
        for key in ("hosts", "env", "mounts"):
            add = table.get(f"add_{key}")
            if add is None:
                continue
            if key in t:
                cur = list(t[key])
            elif base is None:
                cur = []
            elif key == "mounts":
                cur = [{"path": m.path, "mode": m.mode, "why": m.why} for m in base.mounts]
            else:
                cur = list(getattr(base, key))
            t[key] = cur + [x for x in add if x not in cur]
        out[name] = t
    return out


def apply_config(opts: Any, cfg: Config, explicit: set[str]) -> Any:
    """Merge the config into parsed Options (mutates and returns it). `explicit`: the
    option names given on the command line (they win over the config)."""
    tables: list[dict[str, Any]] = [cfg.defaults]
    if "profile" not in explicit and "profile" in cfg.defaults:
        opts.profile = cfg.defaults["profile"]
    if opts.profile not in cfg.profile_names():
        raise UsageError(f"--profile {opts.profile}: unknown profile "
                         f"(known: {', '.join(cfg.profile_names())})")
    if opts.profile in cfg.profiles:
        tables.append(cfg.profiles[opts.profile])
    cli_lists = {attr: list(getattr(opts, attr)) for attr, kind in OPTION_KEYS.values()
                 if kind == "list"}
    merged: dict[str, list[str]] = {attr: [] for attr in cli_lists}
    for table in tables:
        for key, value in table.items():
            if key not in OPTION_KEYS:
                continue
            attr, kind = OPTION_KEYS[key]
            if kind == "list":
                merged[attr] += [x for x in value if x not in merged[attr]]
            elif attr not in explicit:
                setattr(opts, attr, value)
    # config entries first (defaults, then the profile), the command line's after
    for attr, cli in cli_lists.items():
        setattr(opts, attr, merged[attr] + [x for x in cli if x not in merged[attr]])
    return opts
