"""Issue 9: the config file (supervisor/config.py), its precedence and `config show`."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from agentpen.supervisor.config import ConfigError, apply_config, load_config, locate, registry_extra
from agentpen.supervisor.options import parse_args
from agentpen.supervisor.resolve import resolve_policy
from agentpen.supervisor.show import effective, render
from agentpen.workers.jail.registry import load_registry


def _write(tmp_path: Path, text: str) -> dict[str, str]:
    cfgdir = tmp_path / "xdg" / "agentpen"
    cfgdir.mkdir(parents=True, exist_ok=True)
    (cfgdir / "config.toml").write_text(textwrap.dedent(text))
    home = tmp_path / "home"
    (home / "proj").mkdir(parents=True, exist_ok=True)
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(home),
            "XDG_STATE_HOME": str(tmp_path / "state"), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _err(tmp_path, text) -> str:
    env = _write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(env)
    return ei.value.message


def test_no_file_is_an_empty_config(tmp_path):
    cfg = load_config({"XDG_CONFIG_HOME": str(tmp_path / "none"), "HOME": str(tmp_path)})
    assert cfg.path is None and cfg.defaults == {} and cfg.profile_names() == ("untrusted", "paranoid")


def test_syntax_error_names_file_and_line(tmp_path):
    msg = _err(tmp_path, """\
        [defaults]
        allow = ["a.example.com"]
        env = = 1
    """)
    assert "config.toml" in msg and "line 3" in msg, msg


@pytest.mark.parametrize("text, line, key", [
    ('[defaults]\nallow = ["ok.example"]\nlog_level = "loud"\n', 3, "defaults.log_level"),
    ('[defaults]\n\n\nbogus = 1\n', 4, "defaults.bogus"),
    ('[agents.claude]\nadd_hosts = ["ok.example"]\nadd_env = ["1BAD"]\n', 3, "agents.claude.add_env"),
    ('[agents.claude]\nhosts = ["*"]\n', 2, "agents.claude.hosts"),
    ('# c\n[agents.x]\nmounts = [{ path = "/etc", mode = "rw" }]\n', 3, "agents.x.mounts"),
    ('[profiles.work]\nbase = "lenient"\n', 2, "profiles.work.base"),
    ('[profiles.paranoid]\nallow = []\n', 1, "profiles.paranoid"),
    ('[defaults]\nprofile = "nope"\n', 2, "defaults.profile"),
    ('[misc]\nx = 1\n', 1, "misc"),
    ('defaults.allow = "one"\n', 1, "defaults.allow"),
])
def test_schema_errors_name_file_line_and_key(tmp_path, text, line, key):
    msg = _err(tmp_path, text)
    assert f"config.toml:{line}:" in msg and f"key {key}:" in msg, msg


def test_locate_finds_keys_in_tables_dotted_and_inline():
    text = '[a]\nx = 1\n[b.c]\ny = 2\n"q.r" = 3\n[d]\ne = { f = 1 }\n'
    assert locate(text, ["a", "x"]) == 2
    assert locate(text, ["b", "c", "y"]) == 4
    assert locate(text, ["b", "c", "q.r"]) == 5
    assert locate(text, ["d", "e", "f"]) == 7  # inside the inline table: its line
    assert locate(text, ["b", "c"]) == 3


def test_precedence_cli_over_profile_over_defaults(tmp_path):
    env = _write(tmp_path, """\
        [defaults]
        allow = ["d.example"]
        log_level = "warning"
        audit_failure = "halt"
        [profiles.work]
        base = "untrusted"
        allow = ["p.example"]
        log_level = "error"
    """)
    cfg = load_config(env)
    o = parse_args(["--profile", "work", "--allow", "c.example", "--log-level", "debug", "x"],
                   profiles=None)
    apply_config(o, cfg, o.explicit)
    assert o.allow == ["d.example", "p.example", "c.example"]
    assert o.log_level == "debug"  # the command line wins
    assert o.audit_failure == "halt"  # from [defaults]
    o2 = parse_args(["--profile", "work", "x"], profiles=None)
    apply_config(o2, cfg, o2.explicit)
    assert o2.log_level == "error"  # the profile over [defaults]
    o3 = parse_args(["x"], profiles=None)
    apply_config(o3, cfg, o3.explicit)
    assert o3.log_level == "warning" and o3.allow == ["d.example"]


def test_explicit_default_value_on_the_command_line_still_wins(tmp_path):
    env = _write(tmp_path, '[defaults]\naudit_failure = "halt"\nprofile = "paranoid"\n')
    cfg = load_config(env)
    o = parse_args(["--audit-failure", "deny", "--profile", "untrusted", "x"], profiles=None)
    apply_config(o, cfg, o.explicit)
    assert o.audit_failure == "deny" and o.profile == "untrusted"
    o = parse_args(["x"], profiles=None)
    apply_config(o, cfg, o.explicit)
    assert o.profile == "paranoid"  # positive control: the config applies when not given


def test_unknown_profile_is_refused(tmp_path):
    env = _write(tmp_path, '[profiles.work]\nallow = ["a.example"]\n')
    cfg = load_config(env)
    o = parse_args(["--profile", "play", "x"], profiles=None)
    with pytest.raises(Exception, match="play: unknown profile"):
        apply_config(o, cfg, o.explicit)


def test_agent_additions_and_overrides_and_new_agents(tmp_path):
    env = _write(tmp_path, """\
        [agents.claude]
        add_hosts = ["mcp.internal.example"]
        add_env = ["MY_TOKEN"]
        add_mounts = [{ path = "~/.prompts", mode = "ro", why = "shared prompts" }]
        [agents.codex]
        hosts = ["only.example"]
        [agents.mytool]
        commands = ["mytool"]
        hosts = ["api.mytool.dev"]
    """)
    reg = load_registry(extra=registry_extra(load_config(env)))
    shipped = load_registry()
    assert reg["claude"].hosts == (*shipped["claude"].hosts, "mcp.internal.example")
    assert "MY_TOKEN" in reg["claude"].env and "ANTHROPIC_API_KEY" in reg["claude"].env
    assert reg["claude"].mounts[-1].path == "~/.prompts" and len(reg["claude"].mounts) == 3
    assert reg["codex"].hosts == ("only.example",)
    assert reg["mytool"].commands == ("mytool",) and reg["mytool"].hosts == ("api.mytool.dev",)


def test_config_reaches_the_policy(tmp_path):
    env = _write(tmp_path, """\
        [defaults]
        allow = ["d.example"]
        [agents.sh]
        commands = ["sh"]
        hosts = ["sh-agent.example"]
        env = ["SH_VAR"]
    """)
    env["SH_VAR"] = "s3cret"
    cfg = load_config(env)
    o = parse_args(["sh", "-c", "true"], profiles=None)
    apply_config(o, cfg, o.explicit)
    p = resolve_policy(o, env, cwd=str(Path(env["HOME"]) / "proj"), config=cfg, dry_run=True)
    assert p.agent == "sh" and p.allow == ["sh-agent.example", "d.example"]
    assert p.env["SH_VAR"] == "s3cret"


def test_config_show_names_env_but_never_values(tmp_path, monkeypatch):
    env = _write(tmp_path, '[agents.sh]\ncommands = ["sh"]\nhosts = ["a.example"]\nenv = ["SH_VAR"]\n'
                           'mounts = [{ path = "~/.shtool", mode = "rw", why = "tool state" }]\n')
    env["SH_VAR"] = "value-must-not-show"
    proj = Path(env["HOME"]) / "proj"
    info = effective(["--allow", "b.example", "sh", "-c", "true"], env, cwd=str(proj))
    text = render(info)
    dumped = json.dumps(info)
    assert "SH_VAR" in text and "value-must-not-show" not in text + dumped
    assert info["allow"] == ["a.example", "b.example"]
    assert any(m["path"] == str(proj) and m["mode"] == "rw" for m in info["mounts"])
    assert any("tool state" in m["why"] and "created at the first run" in m["why"] for m in info["mounts"])
    assert not (Path(env["HOME"]) / ".shtool").exists()  # show creates nothing
    assert info["bwrap_argv"][0].endswith("bwrap") and "--seccomp" in info["bwrap_argv"]
    assert info["seccomp"]["rules"] > 10 and "ptrace" in info["seccomp"]["syscalls"]
    assert any(c["path"] == str(proj / ".git") for c in info["protected"])


def test_config_show_without_command_lists_profiles(tmp_path):
    env = _write(tmp_path, '[profiles.work]\nallow = ["a.example"]\n')
    info = effective([], env)
    assert list(info["profiles"]) == ["untrusted", "paranoid", "work"]
    assert "work" in render(info)


def test_the_config_directory_is_never_mountable(tmp_path):
    env = _write(tmp_path, "[defaults]\n")
    xdg = env["XDG_CONFIG_HOME"]
    for flag in ("--mount-rw", "--mount"):
        o = parse_args([flag, xdg, "sh"], profiles=None)
        with pytest.raises(Exception, match="agentpen's own state"):
            resolve_policy(o, env, cwd=str(Path(env["HOME"]) / "proj"), dry_run=True)
    other = tmp_path / "other"
    other.mkdir()
    o = parse_args(["--mount-rw", str(other), "sh"], profiles=None)  # control
    assert resolve_policy(o, env, cwd=str(Path(env["HOME"]) / "proj"), dry_run=True).mounts


def test_show_lists_caps_for_a_profile_based_on_paranoid(tmp_path):
    env = _write(tmp_path, '[profiles.strict]\nbase = "paranoid"\nmax_procs = 64\n')
    info = effective(["--profile", "strict", "sh"], env, cwd=str(Path(env["HOME"]) / "proj"))
    assert info["base_profile"] == "paranoid" and info["limits"]["max_procs"].startswith("64 ")
    assert "throwaway copy" in next(m["why"] for m in info["mounts"] if m["path"].endswith("/proj"))
