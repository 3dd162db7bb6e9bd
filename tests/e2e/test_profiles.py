"""Issue 9 end to end: learn mode, the paranoid profile (throwaway project, apply /
discard, private agent config, resource caps) and the config file, through the real
bwrap, pasta, nft and proxy."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _curl():
    if not shutil.which("curl"):
        pytest.fail("curl is needed for these tests (apt-get install curl)")


def _curl(upstream, name: str | None = None) -> str:
    return (f"curl -sS --max-time 10 --cacert {upstream.cert} https://{name or upstream.name}/; "
            "echo rc=$?")


# -- learn mode -------------------------------------------------------------------------------


def test_learn_mode_lets_an_unlisted_name_through_and_names_it_at_the_end(sandbox, upstream):
    pin = f"{upstream.name}=127.0.0.1:{upstream.port}"
    r = sandbox.run("--learn", "--upstream", pin, "--mount", str(upstream.cert),
                    "--", "sh", "-c", _curl(upstream) + "; cat ~/.ssh/id_ed25519; echo fs=$?")
    assert "hello from upstream" in r.stdout, (r.stdout, r.stderr)
    assert upstream.snis == [upstream.name]
    assert "fs=1" in r.stdout or "fs=2" in r.stdout, r.stdout  # filesystem confinement stays on
    assert "LEARN MODE" in r.stderr and "egress is OPEN" in r.stderr
    assert f"--allow {upstream.name}" in r.stderr, r.stderr
    assert f'allow = ["{upstream.name}"]' in r.stderr
    events = r.audit()
    actions = [e["event"]["action"] for e in events]
    assert "learn-mode" in actions
    learn_ev = next(e for e in events if e["event"]["action"] == "learn-mode")
    assert learn_ev["log"]["level"] == "critical" if "log" in learn_ev else True
    allowed = [e for e in events if e["event"]["action"] == "connection-allowed"]
    assert allowed and allowed[0]["agentpen"]["would_block"] is True
    started = next(e for e in events if e["event"]["action"] == "session-started")
    assert "LEARN" in started["agentpen"]["layers"]["egress"]


def test_without_learn_the_same_pin_is_refused_and_the_name_blocked(sandbox, upstream):
    # Positive control for the test above: the pin alone is refused before anything runs.
    pin = f"{upstream.name}=127.0.0.1:{upstream.port}"
    r = sandbox.run("--upstream", pin, "--", "true")
    assert r.returncode == 125 and f"add --allow {upstream.name}" in r.stderr
    assert upstream.accepted == 0


def test_learn_mode_with_everything_allowed_says_so(sandbox, upstream):
    pin = f"{upstream.name}=127.0.0.1:{upstream.port}"
    r = sandbox.run("--learn", "--allow", upstream.name, "--upstream", pin, "--mount", str(upstream.cert),
                    "--", "sh", "-c", _curl(upstream))
    assert "hello from upstream" in r.stdout
    assert "would have let everything through" in r.stderr
    assert "--allow" not in r.stderr.split("learn mode:")[-1]


# -- paranoid ----------------------------------------------------------------------------------

SCRIPT = "echo new > added.txt; echo changed > README; mkdir -p sub && echo x > sub/f; cat README"


def test_paranoid_discard_leaves_the_project_untouched(sandbox):
    before = (sandbox.project / "README").read_text()
    r = sandbox.run("--profile", "paranoid", "--discard", "--", "sh", "-c", SCRIPT)
    assert r.returncode == 0, r.stderr
    assert "changed" in r.stdout  # positive control: inside, the write happened
    assert (sandbox.project / "README").read_text() == before
    assert not (sandbox.project / "added.txt").exists()
    assert "A added.txt" in r.stderr and "M README" in r.stderr and "discarded" in r.stderr
    ev = next(e for e in r.audit() if e["event"]["action"] == "project-changes")
    assert ev["agentpen"]["decision"] == "discard"
    assert ev["agentpen"]["added"] == ["added.txt", "sub", "sub/f"]
    assert not list((sandbox.state / "agentpen" / "sessions").iterdir())  # removed


def test_paranoid_apply_reaches_the_project_only_at_the_end(sandbox):
    (sandbox.project / "gone.txt").write_text("delete me\n")
    r = sandbox.run("--profile", "paranoid", "--apply", "--", "sh", "-c",
                    SCRIPT + f"; rm gone.txt; test -e {sandbox.project}/added.txt && echo same-path")
    assert r.returncode == 0, r.stderr
    assert "same-path" in r.stdout  # the copy is bound at the project's own path
    assert (sandbox.project / "README").read_text() == "changed\n"
    assert (sandbox.project / "added.txt").read_text() == "new\n"
    assert (sandbox.project / "sub" / "f").read_text() == "x\n"
    assert not (sandbox.project / "gone.txt").exists()
    assert "D gone.txt" in r.stderr and "applied" in r.stderr
    # The protection placeholders bwrap made in the copy are not changes.
    assert not (sandbox.project / ".envrc").exists() and ".envrc" not in r.stderr


def test_paranoid_without_terminal_or_flag_applies_nothing_and_keeps_the_copy(sandbox):
    r = sandbox.run("--profile", "paranoid", "--", "sh", "-c", SCRIPT)
    assert r.returncode == 0, r.stderr
    assert not (sandbox.project / "added.txt").exists()
    assert "not applied" in r.stderr
    sessions = list((sandbox.state / "agentpen" / "sessions").iterdir())
    assert len(sessions) == 1 and (sessions[0] / "project" / "added.txt").read_text() == "new\n"
    assert oct(sessions[0].stat().st_mode & 0o777) == "0o700"


def test_paranoid_protected_paths_stay_read_only_in_the_copy(sandbox):
    (sandbox.project / ".git").mkdir()
    (sandbox.project / ".git" / "config").write_text("[core]\n")
    r = sandbox.run("--profile", "paranoid", "--apply", "--", "sh", "-c",
                    "echo evil >> .git/config; echo rc=$?; echo ok > fine.txt")
    assert "rc=0" not in r.stdout
    assert (sandbox.project / ".git" / "config").read_text() == "[core]\n"
    assert (sandbox.project / "fine.txt").exists()  # positive control: applied


def test_paranoid_agent_config_is_a_private_copy(sandbox, tmp_path):
    cfg = tmp_path / "xdg" / "agentpen"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text(textwrap.dedent("""\
        [agents.shtool]
        commands = ["sh"]
        mounts = [{ path = "~/.shtool", mode = "rw", why = "tool state" }]
    """))
    (sandbox.home / ".shtool").mkdir()
    (sandbox.home / ".shtool" / "settings").write_text("original\n")
    env = sandbox.env(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    r = sandbox.run("--profile", "paranoid", "--discard", "--", "sh", "-c",
                    "cat ~/.shtool/settings; echo planted > ~/.shtool/settings; echo hook > ~/.shtool/h; "
                    "cat ~/.shtool/settings", env=env)
    assert r.stdout.split() == ["original", "planted"], (r.stdout, r.stderr)  # writable inside
    assert (sandbox.home / ".shtool" / "settings").read_text() == "original\n"
    assert not (sandbox.home / ".shtool" / "h").exists()
    # Untrusted (control): the same config is the real, writable one.
    r = sandbox.run("--", "sh", "-c", "echo real > ~/.shtool/settings", env=env)
    assert (sandbox.home / ".shtool" / "settings").read_text() == "real\n"


def test_wall_clock_cap_ends_the_command_and_is_audited(sandbox):
    r = sandbox.run("--wall-time", "2s", "--", "sh", "-c", "echo started; exec sleep 30", timeout=40)
    assert "started" in r.stdout
    assert r.returncode == 128 + 15, (r.returncode, r.stderr)
    hit = [e for e in r.audit() if e["event"]["action"] == "limit-hit"]
    assert hit and hit[0]["agentpen"]["limit"] == "wall_time"


def _limits(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        for name in ("Max processes", "Max data size", "Max cpu time"):
            if line.startswith(name):
                out[name] = line[len(name):].split()[0]
    return out


def test_process_and_memory_caps_apply_inside(sandbox):
    forker = ("import os, time\nn = 0\nfor i in range(40):\n    try:\n        pid = os.fork()\n"
              "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(3)\n"
              "        os._exit(0)\n    n += 1\nprint('forks=%d' % n)\n")
    script = f"cat /proc/self/limits; python3 -c \"{forker}\""
    r = sandbox.run("--max-procs", "16", "--memory", "512M", "--", "sh", "-c", script)
    lim = _limits(r.stdout)
    assert lim == {"Max processes": "16", "Max data size": str(512 * 1024 * 1024),
                   "Max cpu time": "unlimited"}, r.stdout
    assert "forks=" in r.stdout and int(r.stdout.split("forks=")[1].split()[0]) < 16, r.stdout
    # control: without the cap, all 40 start
    r = sandbox.run("--", "sh", "-c", script)
    assert "forks=40" in r.stdout, (r.stdout, r.stderr)


def test_paranoid_has_default_caps(sandbox):
    r = sandbox.run("--profile", "paranoid", "--discard", "--", "cat", "/proc/self/limits")
    assert _limits(r.stdout) == {"Max processes": "512", "Max cpu time": str(2 * 3600),
                                 "Max data size": str(8 * 1024 ** 3)}, r.stdout
    started = next(e for e in r.audit() if e["event"]["action"] == "session-started")
    assert "limits" in started["agentpen"]["layers"] and "project" in started["agentpen"]["layers"]


# -- config file --------------------------------------------------------------------------------


def test_config_file_allowlist_reaches_the_proxy(sandbox, upstream, tmp_path):
    cfg = tmp_path / "xdg" / "agentpen"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text(
        f'[defaults]\nallow = ["{upstream.name}"]\nupstream = ["{upstream.name}=127.0.0.1:{upstream.port}"]\n'
        f'mount = ["{upstream.cert}"]\n')
    env = sandbox.env(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    r = sandbox.run("--", "sh", "-c", _curl(upstream), env=env)
    assert "hello from upstream" in r.stdout, (r.stdout, r.stderr)
    # control: without the config the name is not allowed
    r = sandbox.run("--", "sh", "-c", _curl(upstream))
    assert "hello from upstream" not in r.stdout


def test_bad_config_refuses_with_file_line_and_key(sandbox, tmp_path):
    cfg = tmp_path / "xdg" / "agentpen"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('[defaults]\nallow = ["ok.example"]\naudit_failure = "maybe"\n')
    r = sandbox.run("--", "true", env=sandbox.env(XDG_CONFIG_HOME=str(tmp_path / "xdg")))
    assert r.returncode == 125
    assert "config.toml:3" in r.stderr and "defaults.audit_failure" in r.stderr


def test_config_show_runs_nothing(sandbox, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "agentpen.supervisor", "config", "show", "--json",
                          "--", "sh", "-c", "touch ran"], cwd=sandbox.project, env=sandbox.env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["project"] == str(sandbox.project) and "SECRET_HOST_TOKEN" not in json.dumps(info)
    assert not (sandbox.project / "ran").exists()
    assert not Path(sandbox.state / "agentpen" / "sessions").exists()


def _run_on_pty(sandbox, args: list[str], answer: bytes) -> tuple[int, str]:
    """agentpen with a terminal as stdin/stdout/stderr (its controlling tty); `answer`
    is typed once the apply question shows."""
    import fcntl
    import os
    import select
    import subprocess
    import sys
    import termios
    import time

    master, slave = os.openpty()

    def ctty():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen([sys.executable, "-m", "agentpen.supervisor", "--log-format", "json",
                          "--audit-log", str(sandbox.root / "pty-audit.jsonl"), *args],
                         cwd=sandbox.project, env=sandbox.env(), stdin=slave, stdout=slave,
                         stderr=slave, preexec_fn=ctty)
    os.close(slave)
    out = b""
    answered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 1.0)
        if not r:
            if p.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the last holder of the terminal is gone
            break
        if not chunk:
            break
        out += chunk
        if not answered and b"[y/N]" in out:
            os.write(master, answer)
            answered = True
    os.close(master)
    return p.wait(timeout=30), out.decode(errors="replace")


@pytest.mark.parametrize("answer, applied", [(b"y\n", True), (b"\n", False)])
def test_paranoid_asks_on_a_terminal(sandbox, answer, applied):
    code, out = _run_on_pty(sandbox, ["--profile", "paranoid", "--", "sh", "-c", "echo hi > t.txt"],
                            answer)
    assert code == 0, out
    assert "A t.txt" in out and "[y/N]" in out
    assert (sandbox.project / "t.txt").exists() is applied, out
    assert ("paranoid: applied" in out) is applied and ("paranoid: discarded" in out) is not applied
    assert not list((sandbox.state / "agentpen" / "sessions").iterdir())


def test_cpu_time_cap_ends_a_spinning_command_and_is_audited(sandbox):
    r = sandbox.run("--cpu-time", "1", "--", "sh", "-c", "while :; do :; done", timeout=60)
    assert r.returncode == 128 + 24, (r.returncode, r.stderr)  # SIGXCPU
    hit = [e for e in r.audit() if e["event"]["action"] == "limit-hit"]
    assert hit and hit[0]["agentpen"]["limit"] == "cpu_time", [e["event"]["action"] for e in r.audit()]
    # control: the same command under a wall-clock cap only is ended by that, not by CPU time
    r = sandbox.run("--wall-time", "1", "--", "sh", "-c", "while :; do :; done", timeout=60)
    assert [e["agentpen"]["limit"] for e in r.audit() if e["event"]["action"] == "limit-hit"] == \
        ["wall_time"]
