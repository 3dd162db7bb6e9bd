"""Pure parts of the jail worker: seccomp table/program, bwrap argv, protection
plan, env scrub, command resolution, agent registry."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from agentpen.core.policy import Mount, SessionPolicy
from agentpen.workers.jail import seccomp
from agentpen.workers.jail.bwrap import (
    JailFds,
    build_bwrap_argv,
    nsswitch_conf,
    resolv_conf,
)
from agentpen.workers.jail.env import EnvError, check_env, scrub_env
from agentpen.workers.jail.launch import build_jail, jail_covers
from agentpen.workers.jail.layout import EtcEntry, HostLayout
from agentpen.workers.jail.protect import (
    DEFAULT_PROTECTED,
    Cover,
    ProtectError,
    plan_protection,
    protected_list,
    remove_placeholders,
    scratch_contents,
    scratch_root_for,
)
from agentpen.workers.jail.registry import RegistryError, agent_for_command, load_registry
from agentpen.workers.jail.resolve import CommandNotExecutable, CommandNotFound, resolve_command

LAYOUT = HostLayout(
    kind="fhs-merged-usr", ro_dirs=("/usr",), symlinks=(("usr/bin", "/bin"), ("usr/lib", "/lib")),
    etc=(EtcEntry("passwd"), EtcEntry("mtab", "../proc/self/mounts"), EtcEntry("ssl")),
    nsswitch="passwd: files\nhosts: files mdns4_minimal [NOTFOUND=return] dns myhostname\n",
)
FDS = JailFds(seccomp=10, json_status=11, hosts=12, resolv=13, nsswitch=14, empty=(15,))


def policy(**kw: Any) -> SessionPolicy:
    base: dict[str, Any] = dict(
        session_id="s1", profile="untrusted", agent="claude", project="/home/u/src/repo",
        command=["/usr/bin/true", "--x"], command_name="true", allow=[],
        env={"PATH": "/usr/bin", "HOME": "/home/u"}, uid=1000, gid=1000, user="u",
        home="/home/u", runtime_paths=["/run/user/1000/agentpen"],
    )
    base.update(kw)
    return SessionPolicy(**base)


def pairs(argv: list[str], opt: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == opt]


# -- seccomp ---------------------------------------------------------------------


def decode(prog: bytes) -> list[tuple[int, int, int, int]]:
    assert len(prog) % 8 == 0
    return [struct.unpack("HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]


def test_seccomp_table_has_every_required_syscall_with_a_reason() -> None:
    required = {
        "ptrace", "process_vm_readv", "process_vm_writev", "keyctl", "add_key", "request_key",
        "mount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
        "open_tree", "mount_setattr", "pivot_root", "chroot", "bpf", "perf_event_open",
        "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
        "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
        "swapoff", "clock_settime", "clock_adjtime", "settimeofday", "adjtimex", "stime",
        "acct", "quotactl", "syslog", "name_to_handle_at", "open_by_handle_at", "setns",
    }
    assert required <= set(seccomp.BLOCKED)
    assert all(len(why) > 10 for why in seccomp.BLOCKED.values())
    rows = {(r[0], r[1]) for r in seccomp.rule_table()}
    assert ("ioctl", "arg1 & 0xffffffff == 0x5412") in rows
    assert ("ioctl", "arg1 & 0xffffffff == 0x541c") in rows
    assert ("clone", "arg0 & 0x10000000 == 0x10000000") in rows
    assert ("unshare", "arg0 & 0x10000000 == 0x10000000") in rows
    assert ("clone3", "always (ENOSYS)") in rows


@pytest.mark.parametrize("arch,token", [("x86_64", 0xC000003E), ("aarch64", 0xC00000B7)])
def test_seccomp_program_checks_arch_and_kills_foreign_abis(arch: str, token: int) -> None:
    ins = decode(seccomp.build_seccomp_program(arch))
    # ld arch; jeq TOKEN else -> a return KILL_PROCESS
    assert ins[0] == (0x20, 0, 0, 4)
    code, _jt, jf, k = ins[1]
    assert (code, k) == (0x15, token)
    assert ins[1 + 1 + jf] == (0x06, 0, 0, 0x80000000)  # SECCOMP_RET_KILL_PROCESS
    rets = {k for c, _, _, k in ins if c == 0x06}
    assert 0x7FFF0000 in rets  # default allow
    assert 0x00050000 | errno.EPERM in rets
    assert 0x00050000 | errno.ENOSYS in rets  # clone3


def test_seccomp_x86_64_refuses_x32_numbers() -> None:
    ins = decode(seccomp.build_seccomp_program("x86_64"))
    # After loading nr: jge 0x40000000 -> (only nr == -1 passes) else bad-arch KILL.
    i = next(n for n, x in enumerate(ins) if x[0] == 0x35 and x[3] == 0x40000000)
    _, jt, _, _ = ins[i]
    code, _, jf, k = ins[i + 1 + jt]
    assert (code, k) == (0x15, 0xFFFFFFFF)
    target = ins[i + 1 + jt + 1 + jf]
    assert target == (0x06, 0, 0, 0x80000000)


def test_seccomp_ioctl_compares_low_32_bits_only() -> None:
    ins = decode(seccomp.build_seccomp_program("x86_64"))
    # The upper half of arg1 (offset 0x1c) is masked with 0 for the TIOCSTI rule:
    # a request with high bits set still matches.
    hi_loads = [n for n, x in enumerate(ins) if x == (0x20, 0, 0, 0x1C)]
    assert hi_loads
    for n in hi_loads:
        assert ins[n + 1] == (0x54, 0, 0, 0)  # and #0
    assert any(x[0] == 0x15 and x[3] == seccomp.TIOCSTI for x in ins)
    assert any(x[0] == 0x15 and x[3] == seccomp.TIOCLINUX for x in ins)


def test_seccomp_unknown_arch_fails_closed() -> None:
    with pytest.raises(RuntimeError, match="not supported"):
        seccomp.build_seccomp_program("riscv64")


# -- bwrap argv ------------------------------------------------------------------


def test_argv_namespaces_and_forbidden_flags() -> None:
    a = build_bwrap_argv(policy(), LAYOUT, FDS)
    for flag in ("--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
                 "--unshare-uts", "--unshare-cgroup", "--die-with-parent"):
        assert flag in a
    assert a[a.index("--cap-drop") + 1] == "ALL"
    assert a[a.index("--uid") + 1] == "1000" and a[a.index("--gid") + 1] == "1000"
    assert "--unshare-net" not in a  # the netns is already the sandbox's
    assert "--new-session" not in a  # breaks TUI resize and job control
    assert "--clearenv" not in a  # bwrap is started with the scrubbed env instead
    assert a[a.index("--seccomp") + 1] == "10"
    assert a[a.index("--json-status-fd") + 1] == "11"
    assert "--block-fd" not in a


def test_argv_filesystem_order_and_command() -> None:
    p = policy(mounts=[Mount("/home/u/.claude", "rw", "config"), Mount("/opt/tool", "ro")])
    a = build_bwrap_argv(p, LAYOUT, FDS)
    assert ("/usr", "/usr") in pairs(a, "--ro-bind")
    assert ("usr/bin", "/bin") in pairs(a, "--symlink")
    assert ("../proc/self/mounts", "/etc/mtab") in pairs(a, "--symlink")
    assert ("/etc/passwd", "/etc/passwd") in pairs(a, "--ro-bind-try")
    assert ("12", "/etc/hosts") in pairs(a, "--ro-bind-data")
    assert ("13", "/etc/resolv.conf") in pairs(a, "--ro-bind-data")
    assert ("14", "/etc/nsswitch.conf") in pairs(a, "--ro-bind-data")
    assert ("/home/u/.claude", "/home/u/.claude") in pairs(a, "--bind")
    assert ("/opt/tool", "/opt/tool") in pairs(a, "--ro-bind")
    i_home = a.index("--tmpfs", a.index("/etc") + 1)
    assert a[i_home + 1] == "/home/u"
    i_cfg = a.index("/home/u/.claude")
    i_proj = a.index("/home/u/src/repo")
    assert i_home < i_cfg < i_proj  # home tmpfs, then config, then the project on top
    assert a[i_proj - 1] == "--bind"
    assert a[a.index("--chdir") + 1] == "/home/u/src/repo"
    sep = a.index("--")
    assert a[sep + 1 :] == [
        "/usr/bin/env", "--default-signal=INT,QUIT,TSTP,TTIN,TTOU,PIPE,XFSZ", "--",
        "/usr/bin/true", "--x",
    ]
    for d in ("/proc", "/dev"):
        assert d in a
    tmpfs = [a[i + 1] for i, x in enumerate(a) if x == "--tmpfs"]
    assert {"/tmp", "/run", "/var/tmp", "/etc", "/home/u"} <= set(tmpfs)


@pytest.mark.parametrize(
    "path,why",
    [
        ("/", "whole host"),
        ("/home/u", "home directory"),
        ("/home", "home directory"),
        ("/run/user/1000/agentpen", "runtime"),
        ("/run/user/1000/agentpen/x", "runtime"),
        ("/run/user/1000", "runtime"),
        ("relative/x", "absolute"),
        ("/home/u/../u", "normalised"),
        ("/proc/1", "kernel"),
    ],
)
def test_argv_refuses_dangerous_mounts(path: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        build_bwrap_argv(policy(mounts=[Mount(path, "ro")]), LAYOUT, FDS)


@pytest.mark.parametrize("project", ["/", "/home/u", "/home", "/run/user/1000/agentpen/p"])
def test_argv_refuses_dangerous_project(project: str) -> None:
    with pytest.raises(ValueError, match="project"):
        build_bwrap_argv(policy(project=project), LAYOUT, FDS)


def test_argv_covers_after_project() -> None:
    covers = [
        Cover("/home/u/src/repo/.git", "pin", ".git/hooks/"),
        Cover("/home/u/src/repo/.git/hooks", "ro-bind", ".git/hooks/"),
        Cover("/home/u/src/repo/.vscode", "dir", ".vscode/"),
        Cover("/home/u/src/repo/.envrc", "file", ".envrc"),
    ]
    a = build_bwrap_argv(policy(), LAYOUT, FDS, covers)
    i_proj = a.index("/home/u/src/repo")
    assert a.index("/home/u/src/repo/.git") > i_proj
    assert ("/home/u/src/repo/.git", "/home/u/src/repo/.git") in pairs(a, "--bind")
    assert ("/home/u/src/repo/.git/hooks", "/home/u/src/repo/.git/hooks") in pairs(a, "--ro-bind")
    assert ("15", "/home/u/src/repo/.envrc") in pairs(a, "--ro-bind-data")
    i = a.index("/home/u/src/repo/.vscode")
    assert a[i - 1] == "--tmpfs"
    assert a[i + 1 : i + 3] == ["--remount-ro", "/home/u/src/repo/.vscode"]
    with pytest.raises(ValueError, match="inside the project"):
        build_bwrap_argv(policy(), LAYOUT, FDS, [Cover("/etc/x", "ro-bind", "x")])
    with pytest.raises(ValueError, match="one empty data fd"):
        build_bwrap_argv(policy(), LAYOUT, JailFds(1, 2, 3, 4, 5), covers)


def test_argv_scratch_cover_binds_its_source_writable() -> None:
    c = Cover("/home/u/src/repo/.opencode", "scratch", ".opencode/", source="/tmp/s/.opencode")
    a = build_bwrap_argv(policy(), LAYOUT, FDS, [c])
    assert ("/tmp/s/.opencode", "/home/u/src/repo/.opencode") in pairs(a, "--bind")
    assert a.index("/home/u/src/repo/.opencode") > a.index("/home/u/src/repo")
    for bad in ("", "/home/u/src/repo/x"):  # no source, or one the project could reach
        with pytest.raises(ValueError, match="source outside the project"):
            build_bwrap_argv(policy(), LAYOUT, FDS, [Cover(c.path, "scratch", c.rel, source=bad)])


def test_staged_resolver_files() -> None:
    assert resolv_conf() == "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
    with pytest.raises(ValueError):
        resolv_conf(5353)
    ns = nsswitch_conf(LAYOUT.nsswitch)
    assert "hosts: files dns\n" in ns and "mdns" not in ns and "passwd: files" in ns
    assert nsswitch_conf("") == "hosts: files dns\n"


def test_build_jail_plan_is_pure_and_refuses_host_handles() -> None:
    plan = build_jail(policy(), LAYOUT)
    assert plan.argv[0] == "/usr/bin/bwrap" and plan.seccomp_rules
    with pytest.raises(EnvError):
        build_jail(policy(env={"SSH_AUTH_SOCK": "/x"}), LAYOUT)


# -- protection plan ---------------------------------------------------------------


def test_protect_plan_existing_missing_and_pins(tmp_path: Path) -> None:
    proj = str(tmp_path)
    os.makedirs(f"{proj}/.git/hooks")
    open(f"{proj}/.git/config", "w").close()
    os.makedirs(f"{proj}/.vscode")
    covers = {c.path[len(proj) + 1 :]: c.kind for c in plan_protection(proj, protected_list())}
    assert covers[".git"] == "pin"
    assert covers[".git/hooks"] == "ro-bind"
    assert covers[".git/config"] == "ro-bind"
    assert covers[".git/modules"] == "dir"  # missing: placeholder directory
    assert covers[".vscode"] == "ro-bind"
    assert covers[".envrc"] == "file"
    assert covers[".claude"] == "dir"
    # pins come first (mount order), outermost first
    order = plan_protection(proj, protected_list())
    assert order[0].kind == "pin"


def test_protect_plan_first_missing_component_and_gitfile(tmp_path: Path) -> None:
    proj = str(tmp_path)
    covers = plan_protection(proj, [".git/hooks/", ".git/config", "a/b/c.txt"])
    kinds = {c.path[len(proj) + 1 :]: c.kind for c in covers}
    assert kinds == {".git": "dir", "a": "dir"}  # nested covers dropped
    open(f"{proj}/.git", "w").close()  # worktree-style gitfile
    kinds = {c.path[len(proj) + 1 :]: c.kind for c in plan_protection(proj, [".git/hooks/"])}
    assert kinds == {".git": "ro-bind"}


def test_protect_refuses_symlinks_and_escapes(tmp_path: Path) -> None:
    proj = str(tmp_path)
    os.symlink("/tmp", f"{proj}/.vscode")
    with pytest.raises(ProtectError, match="symlink"):
        plan_protection(proj, [".vscode/"])
    for bad in ("../x", "/etc/passwd", "a/./b", ""):
        with pytest.raises(ProtectError):
            plan_protection(proj, [bad])


def test_protect_list_add_and_lift() -> None:
    lst = protected_list(["secret/"], [".envrc"])
    assert "secret/" in lst and ".envrc" not in lst and ".git/hooks/" in lst
    assert ".claude/" in DEFAULT_PROTECTED and ".mcp.json" in DEFAULT_PROTECTED


def test_jail_covers_reads_policy_protect(tmp_path: Path) -> None:
    p = policy(project=str(tmp_path), protect=["extra.sh"], unprotect=[".envrc"])
    rels = {c.rel for c in jail_covers(p)}
    assert "extra.sh" in rels and ".envrc" not in rels


def test_protect_plan_scratch_only_for_missing_agent_config(tmp_path: Path) -> None:
    proj = str(tmp_path)
    os.makedirs(f"{proj}/.claude")  # exists: the repository's own, read-only
    root = "/tmp/agentpen-scratch-1"
    covers = {c.rel: c for c in plan_protection(proj, protected_list(), root)}
    assert covers[".claude/"].kind == "ro-bind"
    assert covers[".opencode/"].kind == "scratch"
    assert covers[".opencode/"].source == f"{root}/.opencode"
    assert covers[".opencode/"].placeholder  # its mount point is removed after the run
    assert covers[".vscode/"].kind == "dir" and covers[".envrc"].kind == "file"  # not agent state
    # without a scratch root (--show of old, or a project that holds the temp dir): read-only
    assert {c.kind for c in plan_protection(proj, [".opencode/"])} == {"dir"}
    # a missing parent of a scratch entry stays a read-only placeholder
    assert {c.kind for c in plan_protection(proj, [".opencode/plugins/"], root)} == {"dir"}


def test_scratch_root_is_never_inside_the_project(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert scratch_root_for(str(tmp_path)) is None
    other = scratch_root_for(str(tmp_path / "elsewhere"))
    assert other is not None and os.path.dirname(other) == str(tmp_path)
    assert scratch_root_for(str(tmp_path / "elsewhere")) != other  # fresh each time


def test_scratch_contents_lists_files_and_links_not_following(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.md").write_text("abc")
    (src / "link").symlink_to("/etc")
    c = Cover("/p/.claude", "scratch", ".claude/", source=str(src))
    got, truncated = scratch_contents([c, Cover("/p/.git", "pin", ".git/")])
    assert dict(got) == {"/p/.claude/sub/a.md": 3, "/p/.claude/link": len("/etc")} and not truncated
    assert scratch_contents([c], limit=1) == (got[:1], True)


def test_remove_placeholders_keeps_content(tmp_path: Path) -> None:
    d = tmp_path / "ph"
    d.mkdir()
    f = tmp_path / "f.json"
    f.write_text("")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    covers = [Cover(str(d), "dir", "ph/"), Cover(str(f), "file", "f.json"),
              Cover(str(full), "dir", "full/"), Cover(str(tmp_path), "pin", "x")]
    left = remove_placeholders(covers)
    assert not d.exists() and not f.exists()
    assert left == [str(full)] and (full / "x").read_text() == "keep"


# -- env ---------------------------------------------------------------------------

HOST_ENV = {
    "TERM": "xterm-kitty", "COLORTERM": "truecolor", "LANG": "en_GB.UTF-8", "LC_ALL": "C",
    "TZ": "UTC", "PATH": "/home/u/bin:/usr/bin", "HOME": "/home/u", "SSH_AUTH_SOCK": "/s",
    "GPG_AGENT_INFO": "x", "DBUS_SESSION_BUS_ADDRESS": "unix:x", "XDG_RUNTIME_DIR": "/run/u",
    "DISPLAY": ":0", "WAYLAND_DISPLAY": "w", "AWS_SECRET_ACCESS_KEY": "nope",
    "ANTHROPIC_API_KEY": "sk-ant", "MY_VAR": "mine", "LD_PRELOAD": "/evil.so",
}


def test_scrub_env_allowlist() -> None:
    ident = {"home": "/home/u", "user": "u", "shell": "/bin/bash"}
    env = scrub_env(HOST_ENV, **ident,
                    path_dirs=["/home/u/.nvm/versions/node/v20/bin"],
                    passthrough=["ANTHROPIC_API_KEY", "SSH_AUTH_SOCK", "UNSET_X"],
                    extra=["MY_VAR"], local_bin_exists=True)
    assert env == {
        "TERM": "xterm-kitty", "COLORTERM": "truecolor", "LANG": "en_GB.UTF-8", "LC_ALL": "C",
        "TZ": "UTC", "ANTHROPIC_API_KEY": "sk-ant", "MY_VAR": "mine", "HOME": "/home/u",
        "USER": "u", "LOGNAME": "u", "SHELL": "/bin/bash",
        "PATH": "/home/u/.local/bin:/home/u/.nvm/versions/node/v20/bin:/usr/local/bin:"
                "/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
    }
    check_env(env)


@pytest.mark.parametrize("name", ["SSH_AUTH_SOCK", "DISPLAY", "XDG_RUNTIME_DIR", "LD_PRELOAD"])
def test_scrub_env_refuses_host_handles_by_name(name: str) -> None:
    with pytest.raises(EnvError, match=name):
        ident = {"home": "/h", "user": "u", "shell": "/bin/sh"}
        scrub_env(HOST_ENV, **ident, path_dirs=[], extra=[name])
    with pytest.raises(EnvError):
        check_env({name: "x"})


# -- command resolution ------------------------------------------------------------


def _exe(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o700)
    return path


def test_resolve_native_binary_symlink(tmp_path: Path) -> None:
    home = str(tmp_path)
    real = _exe(f"{home}/.local/share/claude/versions/1.2.3", "\x7fELF....")
    os.makedirs(f"{home}/.local/bin")
    os.symlink(real, f"{home}/.local/bin/claude")
    r = resolve_command("claude", f"/nonexistent:{home}/.local/bin:/usr/bin", home)
    assert r.path == real
    assert [m.path for m in r.mounts] == [real]  # the file alone, never ~/.local
    assert r.mounts[0].mode == "ro"


def test_resolve_npm_script_with_nvm_node(tmp_path: Path) -> None:
    home = str(tmp_path)
    ver = f"{home}/.nvm/versions/node/v20.11.0"
    node = _exe(f"{ver}/bin/node", "\x7fELF")
    os.makedirs(f"{ver}/lib/node_modules")
    pkg = f"{home}/.npm-global/lib/node_modules/@openai/codex"
    cli = _exe(f"{pkg}/bin/codex.js", "#!/usr/bin/env node\nconsole.log(1)\n")
    _exe(f"{pkg}/package.json", "{}")
    os.makedirs(f"{home}/.npm-global/bin")
    os.symlink(cli, f"{home}/.npm-global/bin/codex")
    r = resolve_command("codex", f"{home}/.npm-global/bin:{ver}/bin:/usr/bin", home)
    assert r.path == cli and r.interpreter == node
    assert {m.path for m in r.mounts} == {pkg, ver}
    assert f"{ver}/bin" in r.path_dirs


def test_resolve_venv_script(tmp_path: Path) -> None:
    home = str(tmp_path)
    venv = f"{home}/.local/share/pipx/venvs/aider-chat"
    _exe(f"{venv}/pyvenv.cfg", "home = /usr/bin\n")
    os.makedirs(f"{venv}/bin")
    os.symlink("/usr/bin/python3", f"{venv}/bin/python")
    _exe(f"{venv}/bin/aider", f"#!{venv}/bin/python\nimport aider\n")
    r = resolve_command(f"{venv}/bin/aider", "/usr/bin", home)
    assert [m.path for m in r.mounts] == [venv]
    assert r.interpreter == os.path.realpath("/usr/bin/python3")


def test_resolve_system_command_needs_no_mount() -> None:
    r = resolve_command("sh", "/usr/bin:/bin", "/home/nobody")
    assert r.mounts == [] and r.path.startswith(("/usr/", "/bin/"))


def test_resolve_errors(tmp_path: Path) -> None:
    home = str(tmp_path)
    with pytest.raises(CommandNotFound) as e:
        resolve_command("no-such-agent-xyz", "/usr/bin", home)
    assert e.value.exit_code == 127
    with open(f"{home}/plain", "w") as f:
        f.write("x")
    with pytest.raises(CommandNotExecutable) as e2:
        resolve_command(f"{home}/plain", "/usr/bin", home)
    assert e2.value.exit_code == 126
    _exe(f"{home}/script", "#!/usr/bin/env no-such-interp-xyz\n")
    with pytest.raises(CommandNotFound, match="interpreter"):
        resolve_command(f"{home}/script", "/usr/bin", home)


# -- registry ----------------------------------------------------------------------


def test_registry_shipped_agents() -> None:
    reg = load_registry()
    assert {"claude", "codex", "aider", "opencode", "gemini", "qwen"} <= set(reg)
    assert "api.anthropic.com" in reg["claude"].hosts
    assert "api.openai.com" in reg["codex"].hosts
    assert "ANTHROPIC_API_KEY" in reg["claude"].env
    assert ("~/.claude", "rw") in [(m.path, m.mode) for m in reg["claude"].mounts]
    assert ("~/.codex", "rw") in [(m.path, m.mode) for m in reg["codex"].mounts]
    assert agent_for_command("/home/u/.local/bin/claude") == "claude"
    assert agent_for_command("vim") is None


def test_registry_user_extension_and_validation() -> None:
    reg = load_registry({"claude": {"hosts": ["x.example"]}, "mine": {"hosts": ["a.example"]}})
    assert reg["claude"].hosts == ("x.example",) and reg["claude"].env  # other keys kept
    assert reg["mine"].commands == ("mine",)
    with pytest.raises(RegistryError):
        load_registry({"bad": {"mounts": [{"path": "/etc", "mode": "rw"}]}})
    with pytest.raises(RegistryError):
        load_registry({"bad": {"hosts": "not-a-list"}})
    with pytest.raises(RegistryError):
        load_registry({"bad": {"mounts": [{"path": "~/", "mode": "rw"}]}})


def test_detect_layout_reads_etc_and_system_dirs(tmp_path: Path) -> None:
    from agentpen.workers.jail.layout import detect_layout

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("u:x:1000:1000::/home/u:/bin/sh\n")
    (etc / "hosts").write_text("10.0.0.1 internal.corp\n")  # replaced by staged data
    (etc / "resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    (etc / "nsswitch.conf").write_text("hosts: files resolve dns\n")
    (etc / "mtab").symlink_to("../proc/self/mounts")
    (etc / "ssl").mkdir()
    secret = etc / "shadow"
    secret.write_text("root:*:1::::::\n")
    secret.chmod(0)
    lay = detect_layout(str(etc))
    names = {e.name: e.symlink for e in lay.etc}
    assert names["passwd"] is None and names["ssl"] is None
    assert names["mtab"] == "../proc/self/mounts"
    assert not {"hosts", "resolv.conf", "nsswitch.conf"} & set(names)
    # root reads everything: only an ordinary user has the unreadable file left out
    assert ("shadow" in names) == (os.getuid() == 0)
    assert lay.nsswitch == "hosts: files resolve dns\n"
    assert os.path.isabs(lay.bwrap) and lay.env_binary.endswith("/env")
    if os.path.islink("/bin"):  # this host: merged /usr
        assert lay.kind == "fhs-merged-usr" and (os.readlink("/bin"), "/bin") in lay.symlinks
    assert "/usr" in lay.ro_dirs
