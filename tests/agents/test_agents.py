"""Issue 8: the real agents run confined. See tests/agents/conftest.py for the setup."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agentlib import (
    AGENTS,
    HOME,
    Agent,
    Pty,
    Result,
    agent_output,
    agent_params,
    agentpen_env,
    frame_width,
    locate,
    make_project,
    run,
    text_of,
)
from agentpen.workers.jail.registry import load_registry

pytestmark = pytest.mark.e2e

HEADLESS_BOUND = 360.0   # seconds an agent may take to give up on an unreachable API by itself
NEVER_GIVES_UP_AFTER = 150.0  # for an agent that retries forever: long enough to see it retry
REGISTRY = load_registry()
EXTRA_HOSTS: dict[str, dict[str, list[str]]] = {}  # agent -> denied / dns-refused hosts (summary)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _config_paths(agent: Agent) -> list[str]:
    return [m.path for m in REGISTRY[agent.name].home_mounts(HOME)]


def _host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


# -- 1. --version, found where users install it ----------------------------------------------

@pytest.mark.parametrize("agent", agent_params())
def test_version_runs_confined_from_the_users_install(agent: Agent, tmp_path: Path):
    found = locate(agent)
    real = os.path.realpath(found)
    assert _within(str(found), HOME) and _within(real, HOME), (
        f"{agent.command} resolves to {real}: expected a per-user install under {HOME}")
    r = run([*agent_headless_flags(agent), agent.command, "--version"], project=make_project(tmp_path),
            env=agentpen_env(tmp_path, agent, **git_identity_env()), audit=tmp_path / "audit.jsonl",
            timeout=120)
    out = agent_output(r.stdout + "\n" + r.stderr)
    assert r.returncode == 0, out
    assert any(re.match(agent.version_re, line.strip()) for line in r.stdout.splitlines()), r.stdout
    s = r.session()
    assert s["agentpen"]["agent"] == agent.name
    assert s["process"]["executable"] == real
    # The install is mounted read-only and narrowly: never ~/.local, ~/.nvm or the home.
    install = [m.rsplit(":", 1)[0] for m in s["agentpen"]["mounts"] if m.endswith(":ro")]
    assert any(_within(real, m) for m in install), s["agentpen"]["mounts"]
    for m in install:
        assert m.rstrip("/") not in (HOME, f"{HOME}/.local", f"{HOME}/.nvm", f"{HOME}/.npm-global"), m


# -- 2. a headless prompt reaches the API host through the proxy --------------------------------

@pytest.fixture(scope="module")
def headless(tmp_path_factory) -> dict[str, tuple[Result, float]]:
    """Every agent's one-shot prompt with a dummy key, all at once (each in its own project):
    the wall time is the slowest agent's, not the sum. -> name: (result, start time)."""
    def one(agent: Agent) -> tuple[Result, float]:
        locate(agent)
        tmp = tmp_path_factory.mktemp(f"headless-{agent.name}")
        project = make_project(tmp)
        t0 = time.time()
        r = run([*agent_headless_flags(agent), agent.command, *agent.headless], project=project,
                env=agentpen_env(tmp, agent, **git_identity_env()), audit=tmp / "audit.jsonl",
                timeout=HEADLESS_BOUND if agent.gives_up_offline else NEVER_GIVES_UP_AFTER)
        return r, t0

    with ThreadPoolExecutor(len(AGENTS)) as pool:
        futures = {name: pool.submit(one, a) for name, a in AGENTS.items()}
        return {name: f.result() for name, f in futures.items()}


def git_identity_env() -> dict[str, str]:
    """A git identity through git's own environment (no ~/.gitconfig inside the jail)."""
    return {"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "user.name", "GIT_CONFIG_VALUE_0": "agentpen test",
            "GIT_CONFIG_KEY_1": "user.email", "GIT_CONFIG_VALUE_1": "test@example.com"}


# Findings (docs/agents.md) that stop aider under the default policy, worked around here the
# way a user can, each with a strict xfail below that turns red once agentpen is fixed:
#  - the placeholder for a missing protected .aider.conf.yml is an empty file, which aider
#    refuses ("doesn't appear to contain key: value pairs") and exits 2;
#  - aider writes a git identity into .git/config when git has none and crashes on the
#    read-only .git/config: fixed for users with a global identity (passed as GIT_CONFIG_*);
#    the CI user has none, so the headless runs give it one through git's own environment.
AIDER_WORKAROUND: list[str] = []  # the .aider.conf.yml stand-in now reads as {} (fixed)


def agent_headless_flags(agent: Agent) -> list[str]:
    flags = [*agent.headless_flags, *agent.workaround_flags]
    if agent.name == "aider":
        flags += AIDER_WORKAROUND
        for name in git_identity_env():
            flags += ["--env", name]
    return flags


def test_aider_starts_under_the_default_protection(tmp_path: Path):
    agent = AGENTS["aider"]
    locate(agent)
    r = run(["aider", "--version"], project=make_project(tmp_path), env=agentpen_env(tmp_path, agent),
            audit=tmp_path / "audit.jsonl", timeout=120)
    assert r.returncode == 0, agent_output(r.stderr)[-500:]


def test_aider_finds_the_host_git_identity(tmp_path: Path):
    """Finding 2, fixed: the host's user.name/user.email (only those) reach git inside as
    GIT_CONFIG_*, so aider does not write one into the read-only .git/config. Control: a
    user with no identity at all still hits that write (docs/agents.md, finding 2)."""
    agent = AGENTS["aider"]
    locate(agent)
    argv = ["aider", "--message", "hi", "--yes", "--no-check-update", "--exit"]
    xdg = tmp_path / "xdg"
    (xdg / "git").mkdir(parents=True)  # a global git config the way users have one
    (xdg / "git" / "config").write_text("[user]\n\tname = Host User\n\temail = host@example.com\n")
    r = run(argv, project=make_project(tmp_path / "a"),
            env=agentpen_env(tmp_path, agent, XDG_CONFIG_HOME=str(xdg)),
            audit=tmp_path / "a.jsonl", timeout=120)
    assert "Read-only file system" not in r.stderr, agent_output(r.stderr)[-500:]
    assert r.returncode == 0, agent_output(r.stderr)[-500:]
    ident = subprocess.run(["git", "config", "--global", "user.name"], capture_output=True, text=True,
                           env=agentpen_env(tmp_path), timeout=30)
    assert not ident.stdout, "the control needs a test user without a global git identity"
    control = run(argv, project=make_project(tmp_path / "b"), env=agentpen_env(tmp_path, agent),
                  audit=tmp_path / "b.jsonl", timeout=120)
    assert "Read-only file system" in control.stderr, agent_output(control.stderr)[-500:]


@pytest.mark.timeout(HEADLESS_BOUND + 180)
@pytest.mark.parametrize("agent", agent_params())
def test_headless_prompt_reaches_its_api_host_and_exits_by_itself(agent: Agent, headless):
    r, _ = headless[agent.name]
    out = agent_output(r.stdout + "\n" + r.stderr)
    spec = REGISTRY[agent.name]
    denied = sorted({e.get("destination", {}).get("domain") or e.get("tls", {}).get("client", {})
                     .get("server_name", "?") for e in r.events("connection-denied")})
    refused = sorted({e["dns"]["question"]["name"].rstrip(".") for e in r.events("dns-refused")})
    allowed = sorted({e["destination"]["domain"] for e in r.events("connection-allowed")})
    EXTRA_HOSTS[agent.name] = {
        "allowed": allowed,
        "denied": [h for h in denied if not _host_allowed(h, spec.hosts)],
        "dns-refused": [h for h in refused if not _host_allowed(h, spec.hosts)],
    }
    print(f"\n{agent.name}: exit {r.returncode} after {r.seconds:.1f} s; allowed {allowed}; "
          f"not in the registry: denied {EXTRA_HOSTS[agent.name]['denied']}, "
          f"dns-refused {EXTRA_HOSTS[agent.name]['dns-refused']}")
    if agent.gives_up_offline:
        assert not r.timed_out, f"{agent.name} did not exit by itself in {HEADLESS_BOUND} s:\n{out[-3000:]}"
    else:
        assert r.timed_out, f"{agent.name} now gives up by itself: set gives_up_offline (exit {r.returncode})"
    assert agent.api_host in allowed, (allowed, out[-3000:])
    # The proxy accepted it (SNI allowed) and the dial out failed: there is no internet here.
    failed = [e for e in r.audit()
              if e["event"]["action"] in ("connection-closed", "connection-upstream-error")
              and e.get("destination", {}).get("domain") == agent.api_host
              and (e.get("error") or e["event"]["action"] == "connection-upstream-error")]
    assert failed, f"no upstream failure audited for {agent.api_host}"
    assert re.search(agent.error_re, out), out[-3000:]
    if agent.gives_up_offline:
        # It ended by itself with its own error: not agentpen's (125-127), not a signal.
        ok = {0} if agent.exit_zero_on_error else set(range(1, 125))
        assert r.returncode in ok, (r.returncode, out[-3000:])
    else:
        # Stopped with SIGTERM: agentpen ends the session and reports the signal.
        assert r.returncode == 128 + 15, (r.returncode, out[-3000:])
    ended = r.events("session-ended")
    assert ended and ended[0]["process"]["exit_code"] == r.returncode


# -- 3. the config directory persists; nothing else of the home is visible --------------------

def _digest_tree(paths: list[str], since: float) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if os.path.isfile(root) else [
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for f in files:
            try:
                st = os.lstat(f)
                if st.st_mtime >= since and os.path.isfile(f) and not os.path.islink(f) \
                        and st.st_size < 1 << 20:
                    out[f] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
            except OSError:
                continue
    return out


@pytest.mark.timeout(HEADLESS_BOUND + 180)
@pytest.mark.parametrize("agent", agent_params())
def test_config_state_persists_and_nothing_else_of_home_is_visible(agent: Agent, headless, tmp_path: Path):
    r, t0 = headless[agent.name]
    config = _config_paths(agent)
    # Run 1 (the headless prompt) wrote its state through the rw mounts onto the host...
    written = _digest_tree(config, t0 - 1)
    assert written, f"{agent.name} wrote nothing under {config} during its run"
    # ...and the agent's real session mounted only its install (ro) and its config paths.
    for m in r.session()["agentpen"]["mounts"]:
        path, mode = m.rsplit(":", 1)
        if _within(path, HOME) and path not in config:
            # else only read-only install roots: the agent's own, or its node (#!/usr/bin/env node)
            exe = r.session()["process"]["executable"]
            assert mode == "ro" and (_within(exe, path) or os.path.isfile(f"{path}/bin/node")), m
    # Run 2: a new session with the agent's policy sees the same bytes, and no canary.
    canary = Path(HOME) / f"agentpen-canary-{uuid.uuid4().hex}"
    canary.mkdir(mode=0o700)
    try:
        (canary / "secret.txt").write_text("canary secret\n")
        files = sorted(written)
        script = ("for f in " + " ".join(shlex.quote(f) for f in files) + "; do sha256sum \"$f\"; done; "
                  "echo ==; find ~ -mindepth 1 -maxdepth 3 -not -path '*/.git/*' | sort; "
                  "echo ==; cat ~/agentpen-canary-*/secret.txt 2>/dev/null || echo no-canary")
        r2 = run(["--agent", agent.name, "--", "sh", "-c", script], project=make_project(tmp_path),
                 env=agentpen_env(tmp_path, agent), audit=tmp_path / "audit.jsonl", timeout=120)
    finally:
        for f in canary.iterdir():
            f.unlink()
        canary.rmdir()
    assert r2.returncode != 125, r2.stderr
    seen = {}
    head, _, rest = r2.stdout.partition("==\n")
    listing, _, canary_read = rest.partition("==\n")
    assert canary_read.strip() == "no-canary", canary_read
    for line in head.splitlines():
        digest, _, path = line.partition("  ")
        seen[path] = digest
    changed = {f for f in written if seen.get(f) != written[f]}
    # A file the agent rewrites on every start may change between our read and run 2's:
    # compare only those unchanged on the host since.
    changed = {f for f in changed if _digest_tree([f], 0).get(f) == written[f]}
    assert not changed, f"state not visible identically in run 2: {sorted(changed)}"
    assert "agentpen-canary" not in listing
    project_dir = str(tmp_path / "project")
    for entry in listing.splitlines():
        entry = entry.strip()
        if not entry:
            continue
        ok = any(_within(entry, c) or _within(c, entry) for c in config) or \
            _within(project_dir, entry) or _within(entry, project_dir)
        assert ok, f"visible in the jail's home but not the agent's: {entry}"


# -- 4. the TUI under a real pseudo-terminal ---------------------------------------------------

TUI_START = 90.0


def _claude_onboarded() -> None:
    """Claude's first-run onboarding checks that api.anthropic.com answers and, with no
    internet, shows "Unable to connect to Anthropic services" and exits before its TUI: start
    as a user who onboarded (~/.claude.json hasCompletedOnboarding, the one key set)."""
    path = Path(HOME) / ".claude.json"
    state = json.loads(path.read_text() or "{}") if path.exists() else {}
    if state.get("hasCompletedOnboarding") is not True:
        state["hasCompletedOnboarding"] = True
        path.write_text(json.dumps(state, indent=2) + "\n")


@pytest.mark.timeout(TUI_START + 120)
@pytest.mark.parametrize("agent", agent_params())
def test_tui_draws_resizes_quits_and_exit_status_propagates(agent: Agent, tmp_path: Path):
    locate(agent)
    if agent.name == "claude":
        _claude_onboarded()
    project = make_project(tmp_path)
    audit = tmp_path / "audit.jsonl"
    flags = agent_headless_flags(agent)
    term = Pty([*flags, agent.command], project=project,
               env=agentpen_env(tmp_path, agent, **git_identity_env(), **agent.tui_env), audit=audit)
    try:
        drawn = term.read_until(lambda b: len(text_of(b).split()) >= 5, TUI_START)
        screen = text_of(bytes(term.buf))
        assert drawn, f"{agent.name} drew nothing in {TUI_START} s: {screen[-2000:]!r}"
        term.read_quiet(1.5, 20.0)  # the first screen settled
        before = len(term.buf)
        term.resize(24, 70)
        redrawn = term.read_until(lambda b: len(b) > before, 30.0)
        assert redrawn, f"{agent.name} did not redraw after TIOCSWINSZ"
        term.read_quiet(1.0, 10.0)
        if agent.redraw_fits:  # the new frame is laid out for the new size
            width = frame_width(bytes(term.buf[before:]))
            assert 0 < width <= 70, f"{agent.name} redrew {width} columns wide on a 70-column terminal"
        # The quit keys, each sent once the agent reacted to the previous one (double Ctrl-C
        # agents only accept the second press within a short window).
        for key in agent.tui_quit:
            before = len(term.buf)
            term.write(key)
            term.read_until(lambda b, n=before: len(b) > n or term.proc.poll() is not None, 5.0)
            if term.proc.poll() is not None:
                break
        code = term.wait(20.0)
        screen = text_of(bytes(term.buf))
        assert code is not None, f"{agent.name} did not quit on {agent.tui_quit!r}: {screen[-2000:]!r}"
    finally:
        term.close()
    ended = [e for e in Result(0, "", "", audit, 0).audit() if e["event"]["action"] == "session-ended"]
    assert ended, "no session-ended"
    print(f"\n{agent.name}: TUI drew, redrew after resize, quit on {agent.tui_quit!r} with exit {code}")
    assert ended[0]["process"]["exit_code"] == code, (ended[0]["process"], code)
    assert code not in (125, 126, 127), screen[-2000:]


@pytest.mark.timeout(TUI_START + 120)
def test_opencode_tui_under_the_default_protection(tmp_path: Path):
    agent = AGENTS["opencode"]
    locate(agent)
    term = Pty(["opencode"], project=make_project(tmp_path), env=agentpen_env(tmp_path, agent),
               audit=tmp_path / "audit.jsonl")
    try:
        term.read_until(lambda b: b"Unexpected server error" in b or term.proc.poll() is not None, TUI_START)
        assert b"Unexpected server error" not in term.buf
    finally:
        term.close()


def test_install_script_is_what_ci_runs():
    """.ci/run installs the agents with this script before the tests (so CI has them)."""
    ci = Path(__file__).resolve().parents[2] / ".ci" / "run"
    assert "tests/agents/install-agents.sh" in ci.read_text()
    script = Path(__file__).with_name("install-agents.sh")
    assert os.access(script, os.X_OK)
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
