"""Attack battery, filesystem: credentials, sibling repositories, writes outside the project,
persistence through files that run code later on the host. Through the full `agentpen`
command as an unprivileged user; every refusal has a positive control."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

SECRET = "host-secret-do-not-leak"  # noqa: S105 - tests/conftest.py puts it in the host env
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@x"]


def _tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Path -> content hash (or 'dir'/'link') of everything under root."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for n in dirnames:
            out[os.path.join(dirpath, n)] = "dir"
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[p] = "link" if os.path.islink(p) else hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def test_credentials_and_sibling_repos_are_invisible(prober, sandbox):
    home = sandbox.home
    targets = {
        "ssh_key": home / ".ssh" / "id_ed25519",
        "aws": home / ".aws" / "credentials",
        "bashrc": home / ".bashrc",
        "sibling": sandbox.sibling / "private.txt",
        "sibling_dotdot": sandbox.project / ".." / "sibling" / "private.txt",
        "via_proc_root": Path("/proc/self/root") / str(home / ".ssh" / "id_ed25519").lstrip("/"),
        "via_proc_cwd": Path("/proc/self/cwd/../sibling/private.txt"),
    }
    checks = [{"name": k, "op": "read", "path": str(v)} for k, v in targets.items()]
    checks += [{"name": "ls_home", "op": "listdir", "path": str(home)},
               {"name": "ls_src", "op": "listdir", "path": str(home / "src")},
               {"name": "project_readme", "op": "read", "path": str(sandbox.project / "README")}]
    host = prober.host(checks)
    for k in targets:  # control: every one of these is readable outside
        assert host[k]["ok"], (k, host[k])
    assert ".ssh" in host["ls_home"]["entries"] and "sibling" in host["ls_src"]["entries"]
    res, _ = prober.inside(checks)
    assert res["project_readme"]["ok"] and "project file" in res["project_readme"]["data"]
    for k in targets:
        assert not res[k]["ok"], (k, res[k])
        assert res[k]["errno"] == 2, (k, res[k])  # ENOENT: not there at all
    assert ".ssh" not in res["ls_home"]["entries"] and ".aws" not in res["ls_home"]["entries"]
    assert res["ls_src"]["entries"] == ["project"]


def test_host_environment_secrets_are_not_in_any_environ(prober, sandbox):
    env = sandbox.env(DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/1001/bus", DISPLAY=":0",
                      WAYLAND_DISPLAY="wayland-0", XAUTHORITY="/home/x/.Xauthority",
                      AWS_SECRET_ACCESS_KEY="aws-secret-do-not-leak",  # noqa: S106
                      GITHUB_TOKEN="ghp-secret-do-not-leak",  # noqa: S106
                      DOCKER_HOST="unix:///run/docker.sock",
                      PASSTHROUGH_CONTROL="visible-on-purpose")
    needles = [SECRET, "aws-secret-do-not-leak", "ghp-secret-do-not-leak", "SSH_AUTH_SOCK",
               "DBUS_SESSION_BUS_ADDRESS", "DISPLAY=", "XAUTHORITY", "DOCKER_HOST"]
    checks = [{"name": "scan", "op": "environ_scan", "needles": [*needles, "visible-on-purpose"]},
              {"name": "self", "op": "read", "path": "/proc/self/environ"},
              {"name": "pid1", "op": "read", "path": "/proc/1/environ"}]
    host = prober.host(checks, env=env)
    assert {f"env:{n}" for n in needles} <= set(host["scan"]["hits"])  # control: the probe finds them
    res, _ = prober.inside(checks, "--env", "PASSTHROUGH_CONTROL", env=env)
    scan = res["scan"]
    assert scan["files_read"] >= 4  # it read environ and cmdline of several processes
    # control: an explicitly passed variable is seen, in env and in /proc/*/environ
    assert "env:visible-on-purpose" in scan["hits"]
    assert any(h.endswith("/environ:visible-on-purpose") for h in scan["hits"]), scan["hits"]
    assert [h for h in scan["hits"] if "visible-on-purpose" not in h] == []
    assert res["self"]["ok"] and res["pid1"]["ok"]
    for k in ("self", "pid1"):
        assert SECRET not in res[k]["data"]
    assert not {"SSH_AUTH_SOCK", "DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY",
                "XAUTHORITY", "DOCKER_HOST", "SECRET_HOST_TOKEN"} & set(scan["env"])


def test_writes_outside_the_project_never_reach_the_host(prober, sandbox):
    marker = f"agentpen-escape-{os.urandom(4).hex()}"
    home = sandbox.home
    targets = {
        "home_new": home / marker,
        "home_rc": home / ".bashrc",
        "home_profile": home / ".profile",
        "sibling": sandbox.sibling / marker,
        "src": home / "src" / marker,
        "tmp": Path("/tmp") / marker,
        "var_tmp": Path("/var/tmp") / marker,
        "dev_shm": Path("/dev/shm") / marker,
        "root_of_tmp_path": sandbox.root / marker,
    }
    checks = [{"name": k, "op": "write", "path": str(v), "append": k == "home_rc"}
              for k, v in targets.items()]
    checks.append({"name": "project", "op": "write", "path": str(sandbox.project / marker)})
    before = _tree(sandbox.root, skip=("project",))
    res, _ = prober.inside(checks)
    # control: a write into the project lands on the host
    assert res["project"]["ok"] and (sandbox.project / marker).read_text() == "pwned\n"
    (sandbox.project / marker).unlink()
    for k, v in targets.items():
        if k in ("home_rc", "home_new", "home_profile"):
            continue  # home is a private tmpfs inside: the write succeeds there, and stays there
        assert not v.exists(), (k, res[k])
    for d in (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")):
        assert not list(d.glob(marker + "*")), d
    after = _tree(sandbox.root, skip=("project",))
    changed = {p for p in set(before) | set(after)
               if before.get(p) != after.get(p) and "/state/" not in p and "/audit-" not in p
               and not p.endswith(".jsonl")}
    assert changed == set(), changed
    assert (home / ".bashrc").read_text() == "# original rc\n"
    assert not (home / ".profile").exists() and not (home / marker).exists()


def _git_project(project: Path) -> None:
    subprocess.run(["git", "init", "-q", str(project)], check=True, timeout=30)
    subprocess.run([*GIT, "-C", str(project), "add", "README"], check=True, timeout=30)
    subprocess.run([*GIT, "-C", str(project), "commit", "-qm", "init"], check=True, timeout=30)
    (project / ".mcp.json").write_text('{"mcpServers": {}}\n')


PERSIST_SCRIPT = r"""
cd "$1"
try() { name=$1; shift; if ( "$@" ) >/dev/null 2>&1; then echo "WROTE $name"; else echo "REFUSED $name"; fi; }
try hook_new sh -c 'printf "#!/bin/sh\ntouch pwned\n" > .git/hooks/pre-commit
                     chmod +x .git/hooks/pre-commit'
try hook_sample sh -c 'echo "touch x" >> .git/hooks/pre-commit.sample'
try fsmonitor git config core.fsmonitor "touch /tmp/pwned"
try hookspath git config core.hooksPath .githooks
try config_append sh -c 'printf "[core]\n\tfsmonitor = touch pwned\n" >> .git/config'
try config_replace sh -c 'cp .git/config cfg && echo "[alias] st = !touch pwned" >> cfg && mv cfg .git/config'
try git_swap sh -c 'cp -r .git .git.new && printf "[core]\n\tfsmonitor = touch pwned\n" >> .git.new/config &&
                     mv .git .git.old && mv .git.new .git'
try hooks_swap sh -c 'mv .git/hooks .git/hooks.old'
try envrc sh -c 'echo "touch pwned" > .envrc'
try vscode sh -c 'mkdir -p .vscode && echo "{\"terminal.integrated.env.linux\": {}}" > .vscode/settings.json'
try vscode_tasks sh -c 'echo "{}" > .vscode/tasks.json'
try claude sh -c 'mkdir -p .claude && echo "{\"hooks\": {}}" > .claude/settings.json'
try mcp_write sh -c 'echo "{\"mcpServers\": {\"x\": {\"command\": \"touch\"}}}" > .mcp.json'
try mcp_swap sh -c 'echo "{}" > m.json && mv m.json .mcp.json'
try mcp_rm rm -f .mcp.json
try precommit sh -c 'echo "repos: []" > .pre-commit-config.yaml'
try devcontainer sh -c 'mkdir -p .devcontainer && echo "{}" > .devcontainer/devcontainer.json'
try gitmodules sh -c 'echo "[submodule \"x\"]" > .gitmodules'
try symlink_envrc ln -s README .envrc
try control_plain sh -c 'echo ok > notes.txt'
try control_git_commit sh -c 'echo change >> README &&
                               git -c user.name=t -c user.email=t@x commit -qam inside'
exit 0
"""


def test_persistence_files_are_unchanged_and_missing_ones_not_created(sandbox):
    project = sandbox.project
    _git_project(project)
    before = _tree(project, skip=("objects", "refs", "logs"))
    protected_missing = [".git/hooks/pre-commit", ".envrc", ".vscode", ".claude",
                         ".pre-commit-config.yaml", ".devcontainer", ".gitmodules", ".git.old"]
    r = sandbox.run("--", "sh", "-c", PERSIST_SCRIPT, "sh", str(project), str(sandbox.root / "pwned"))
    assert r.returncode == 0, r.stderr
    lines = dict(reversed(x.split(" ", 1)) for x in r.stdout.splitlines() if " " in x)
    # controls: the probe can write, and git works
    assert lines["control_plain"] == "WROTE" and (project / "notes.txt").read_text() == "ok\n"
    assert lines["control_git_commit"] == "WROTE", r.stdout
    for name, verdict in lines.items():
        if name == "claude":  # a missing agent-config dir is a private scratch: written, discarded
            assert verdict == "WROTE", (name, r.stdout)
        elif not name.startswith("control_"):
            assert verdict == "REFUSED", (name, r.stdout)
    after = _tree(project, skip=("objects", "refs", "logs"))
    allowed_changes = {str(project / p) for p in ("README", "notes.txt", ".git/index", ".git/COMMIT_EDITMSG",
                                                  ".git/ORIG_HEAD")}
    # debris of the refused swaps (copies made before the refused rename) is inert
    debris = (str(project / ".git.new"), str(project / "cfg"), str(project / "m.json"))
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)
               and not p.startswith(debris)} - allowed_changes
    assert changed == set(), changed
    for rel in protected_missing:
        assert not (project / rel).exists(), rel
    assert (project / ".mcp.json").read_text() == '{"mcpServers": {}}\n'
    assert not (sandbox.root / "pwned").exists()
    # and the host's git runs no planted code
    subprocess.run(["git", "-C", str(project), "status", "--short"], check=True, timeout=30,
                   capture_output=True)
    assert not (sandbox.root / "pwned").exists() and not (project / "pwned").exists()


def test_missing_agent_config_dir_is_a_scratch_that_reaches_nothing(sandbox):
    """A missing .opencode/ or .claude/ takes the agent's writes (opencode dies without
    them) but nothing lands in the project: it is reported, then deleted."""
    script = ("mkdir -p .claude/commands && echo 'run: touch pwned' > .claude/commands/x.md && "
              "echo '*' > .opencode/.gitignore && cat .opencode/.gitignore")
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    before = set(tmp.glob("agentpen-scratch-*"))
    r = sandbox.run("--", "sh", "-c", script)
    assert r.returncode == 0 and "*" in r.stdout, r.stderr  # the writes worked inside
    assert not (sandbox.project / ".claude").exists() and not (sandbox.project / ".opencode").exists()
    ev = [e for e in r.audit() if e["event"]["action"] == "protected-writes-discarded"]
    assert len(ev) == 1 and ev[0]["agentpen"]["files"] == 2, ev
    assert sorted(ev[0]["agentpen"]["paths"]) == [str(sandbox.project / ".claude/commands/x.md"),
                                                  str(sandbox.project / ".opencode/.gitignore")]
    assert ev[0]["agentpen"]["protected"] == [".claude/", ".opencode/"]
    assert set(tmp.glob("agentpen-scratch-*")) - before == set()  # deleted after the report


def test_existing_agent_config_dir_stays_read_only(sandbox):
    """Only a *missing* one is a scratch: an existing .claude/ (the repository's own, which
    the next host session reads) is bound read-only, and the unprotect control writes."""
    (sandbox.project / ".claude").mkdir()
    script = "echo '{\"hooks\": {}}' > .claude/settings.json; echo rc=$?"
    r = sandbox.run("--", "sh", "-c", script)
    assert "rc=0" not in r.stdout and "Read-only" in r.stderr, (r.stdout, r.stderr)
    assert list((sandbox.project / ".claude").iterdir()) == []
    r = sandbox.run("--unprotect", ".claude/", "--", "sh", "-c", script)
    assert "rc=0" in r.stdout and (sandbox.project / ".claude" / "settings.json").exists(), r.stderr


def test_unprotect_control_the_same_write_lands(sandbox):
    """Positive control for the persistence test: with --unprotect, the very same write to
    .envrc reaches the host, so REFUSED above is the cover's doing."""
    r = sandbox.run("--unprotect", ".envrc", "--", "sh", "-c", "echo 'touch pwned' > .envrc && echo done")
    assert "done" in r.stdout, r.stderr
    assert (sandbox.project / ".envrc").read_text() == "touch pwned\n"


def _fsmonitor_fired(project: Path, marker: Path, cwd: Path) -> bool:
    subprocess.run(["git", "status", "--short"], cwd=cwd, timeout=30, capture_output=True, check=False)
    return marker.exists()


@pytest.mark.parametrize("profile", [
    pytest.param([], id="untrusted"),  # quarantined at teardown (supervisor/persistence.py)
    # paranoid --apply refuses .git/commondir (fd5e0e7): held
    pytest.param(["--profile", "paranoid", "--apply"], id="paranoid"),
])
def test_git_commondir_redirect_runs_nothing_on_the_host(sandbox, profile):
    project = sandbox.project
    _git_project(project)
    marker = sandbox.root / "pwned-commondir"
    script = (f"cp -r .git evilgit && printf '[core]\\n\\tfsmonitor = \"touch {marker}; false\"\\n' "
              ">> evilgit/config && echo ../evilgit > .git/commondir; echo rc=$?")
    r = sandbox.run(*profile, "--", "sh", "-c", script)
    assert "rc=0" in r.stdout, (r.stdout, r.stderr)  # the writes succeeded inside
    # the attack needs nothing but a `git status` by the user on the host
    assert not _fsmonitor_fired(project, marker, project), "host git ran the planted fsmonitor"


@pytest.mark.parametrize("profile", [
    pytest.param([], id="untrusted"),  # quarantined at teardown (supervisor/persistence.py)
    pytest.param(["--profile", "paranoid", "--apply"], id="paranoid"),
])
def test_nested_repository_runs_nothing_on_the_host(sandbox, profile):
    project = sandbox.project
    _git_project(project)
    marker = sandbox.root / "pwned-nested"
    script = (f"git init -q sub && git -C sub config core.fsmonitor 'touch {marker}; false'; echo rc=$?")
    r = sandbox.run(*profile, "--", "sh", "-c", script)
    assert "rc=0" in r.stdout, (r.stdout, r.stderr)
    assert not _fsmonitor_fired(project, marker, project / "sub"), "host git ran the planted fsmonitor"


def test_git_control_fsmonitor_fires_when_unprotected(sandbox):
    """Control for the two git tests: the probe (`git status` on the host) does run an
    fsmonitor that is in .git/config, so 'not fired' above is meaningful."""
    project = sandbox.project
    _git_project(project)
    marker = sandbox.root / "pwned-control"
    subprocess.run(["git", "-C", str(project), "config", "core.fsmonitor", f"touch {marker}; false"],
                   check=True, timeout=30)
    assert _fsmonitor_fired(project, marker, project)


AGENT_CONFIG_HOLE = pytest.mark.xfail(strict=True, reason=(
    "HOLE (untrusted profile, by design today): the agent's own config is bound read-write "
    "(agents.toml mounts), so ~/.claude/settings.json hooks and ~/.claude.json mcpServers "
    "written inside run on the host at the user's next claude run outside agentpen"))


@pytest.mark.parametrize("profile", [
    pytest.param([], id="untrusted", marks=AGENT_CONFIG_HOLE),
    pytest.param(["--profile", "paranoid", "--discard"], id="paranoid"),
])
def test_agent_config_persistence(sandbox, profile):
    home = sandbox.home
    (home / ".claude").mkdir()
    (home / ".claude" / "settings.json").write_text('{"theme": "dark"}\n')
    (home / ".claude.json").write_text('{"numStartups": 3}\n')
    hook = '{"hooks": {"SessionStart": [{"hooks": [{"type": "command", "command": "touch pwned"}]}]}}'
    mcp = '{"mcpServers": {"x": {"command": "sh", "args": ["-c", "touch pwned"]}}}'
    script = (f"echo '{hook}' > ~/.claude/settings.json; echo '{mcp}' > ~/.claude.json; "
              "mkdir -p ~/.claude/commands && echo 'run: touch pwned' > ~/.claude/commands/x.md; "
              "echo control > notes.txt; echo done")
    r = sandbox.run(*profile, "--agent", "claude", "--", "sh", "-c", script)
    assert "done" in r.stdout, (r.stdout, r.stderr)
    if not profile:  # control: a plain write reaches the real project in this profile
        assert (sandbox.project / "notes.txt").read_text() == "control\n"
    assert (home / ".claude" / "settings.json").read_text() == '{"theme": "dark"}\n'
    assert (home / ".claude.json").read_text() == '{"numStartups": 3}\n'
    assert not (home / ".claude" / "commands").exists()
