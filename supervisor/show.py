"""`agentpen config show [--json] [OPTIONS] [--] [COMMAND...]`: the effective policy
for a command, without running it (nothing is created, no worker starts)."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from typing import Any

from agentpen.supervisor.config import Config, config_path, load_config


def effective(argv: list[str], env: Mapping[str, str], *, cwd: str | None = None) -> dict[str, Any]:
    from agentpen.supervisor import options
    from agentpen.supervisor.config import apply_config

    cfg = load_config(env)
    opts = options.parse_args(argv, profiles=None, need_command=False)
    apply_config(opts, cfg, opts.explicit)
    out: dict[str, Any] = {
        "config_file": cfg.path,
        "config_searched": config_path(env),
        "profile": opts.profile,
        "defaults": cfg.defaults,
        "profiles": {n: cfg.profiles.get(n, {"base": n}) for n in cfg.profile_names()},
        "agents_from_config": sorted(cfg.agents),
    }
    if not opts.command:
        return out
    return {**out, **_for_command(opts, env, cfg, cwd)}


def _for_command(opts: Any, env: Mapping[str, str], cfg: Config, cwd: str | None) -> dict[str, Any]:
    from agentpen.supervisor.paranoid import limits_from
    from agentpen.supervisor.resolve import resolve_policy
    from agentpen.workers.jail import seccomp
    from agentpen.workers.jail.launch import build_jail, jail_covers
    from agentpen.workers.jail.layout import detect_layout
    from agentpen.workers.jail.protect import scratch_root_for

    policy = resolve_policy(opts, env, cwd=cwd, config=cfg, dry_run=True)
    layout = detect_layout()
    covers = jail_covers(policy, scratch_root_for(policy.project))
    plan = build_jail(policy, layout, covers)
    mounts = [{"path": d, "mode": "ro", "why": f"system ({layout.kind})"} for d in layout.ro_dirs]
    mounts.append({"path": "/etc", "mode": "ro", "why": "staged: readable host entries, own "
                   "hosts/resolv.conf/nsswitch.conf"})
    mounts.append({"path": policy.home, "mode": "tmpfs", "why": "empty home"})
    for d in ("/tmp", "/run", "/var/tmp"):  # noqa: S108 - the jail's own tmpfs, reported
        mounts.append({"path": d, "mode": "tmpfs", "why": "private scratch"})
    for m in policy.mounts:
        note = "" if os.path.exists(m.path) else " (created at the first run)"
        mounts.append({"path": m.path, "mode": m.mode, "why": m.why + note})
    project_why = "the project" if policy.profile != "paranoid" else \
        "a throwaway copy of the project (paranoid): changes are applied only when you say so"
    mounts.append({"path": policy.project, "mode": "rw", "why": project_why})
    table = seccomp.rule_table()
    res: dict[str, Any] = {
        "command": policy.command,
        "agent": policy.agent,
        "base_profile": policy.profile,
        "project": policy.project,
        "learn": policy.learn,
        "allow": policy.allow,
        "upstreams": [f"{u.host}={u.addr}:{u.port}" for u in policy.upstreams],
        "publish": [f"{p.host_port}:{p.sandbox_port}" for p in policy.publish],
        "host_ports": policy.host_ports,
        "env_names": sorted(policy.env),
        "mounts": mounts,
        "protected": [{"path": c.path, "how": c.kind, "entry": c.rel} for c in covers],
        "seccomp": {"rules": len(table), "syscalls": sorted({r[0] for r in table}),
                    "table": [{"syscall": s, "when": w, "why": y} for s, w, y in table]},
        "bwrap_argv": plan.argv,
    }
    if policy.profile == "paranoid":
        res["limits"] = limits_from(opts, paranoid=True).describe()
    return res


def render(info: dict[str, Any]) -> str:
    cfile = info["config_file"] or f"none ({info['config_searched']} does not exist)"
    lines = [f"config file:   {cfile}",
             f"profile:       {info['profile']}" + (
                 f" (based on {info['base_profile']})" if info.get("base_profile")
                 and info["base_profile"] != info["profile"] else "")]
    if "command" not in info:
        lines.append("profiles:      " + ", ".join(info["profiles"]))
        if info["defaults"]:
            lines.append("defaults:      " + json.dumps(info["defaults"]))
        if info["agents_from_config"]:
            lines.append("agents (config): " + ", ".join(info["agents_from_config"]))
        lines.append("(name a command to see its policy: agentpen config show claude)")
        return "\n".join(lines)
    lines += [
        f"command:       {shlex.join(info['command'])}",
        f"agent:         {info['agent'] or 'none (no registry entry: no hosts, no config mounts)'}",
        f"project:       {info['project']}",
    ]
    if info["learn"]:
        lines.append("egress:        LEARN MODE: every name allowed and recorded")
    lines.append("allowed hosts: " + (", ".join(info["allow"]) or "none"))
    for u in info["upstreams"]:
        lines.append(f"  pinned:      {u}")
    if info["publish"] or info["host_ports"]:
        lines.append(f"publish:       {', '.join(info['publish']) or '-'}; host ports: "
                     f"{', '.join(map(str, info['host_ports'])) or '-'}")
    lines.append("environment:   " + " ".join(info["env_names"]) + "  (names only)")
    lines.append("mounts:")
    w = max(len(m["path"]) for m in info["mounts"])
    for m in info["mounts"]:
        lines.append(f"  {m['path'].ljust(w)}  {m['mode']:<5}  {m['why']}")
    lines.append("protected in the project (read-only inside):")
    for c in info["protected"]:
        lines.append(f"  {c['path']}  ({c['how']})")
    sc = info["seccomp"]
    lines.append(f"seccomp:       {sc['rules']} rules over {len(sc['syscalls'])} syscalls: "
                 + ", ".join(sc["syscalls"]))
    if "limits" in info:
        lines.append("limits:        " + ", ".join(f"{k}={v}" for k, v in info["limits"].items()))
    lines.append("bwrap argv:")
    lines.append("  " + shlex.join(info["bwrap_argv"]))
    return "\n".join(lines)


def config_main(argv: list[str], env: Mapping[str, str]) -> int:
    from agentpen.supervisor.errors import UsageError

    if not argv or argv[0] != "show":
        raise UsageError("usage: agentpen config show [--json] [OPTIONS] [--] [COMMAND...]")
    from agentpen.supervisor.options import parse_args

    rest = argv[1:]
    as_json = parse_args(rest, profiles=None, need_command=False).json
    info = effective(rest, env)
    print(json.dumps(info, indent=2) if as_json else render(info))
    return 0
