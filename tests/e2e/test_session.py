"""Issue 2: a confined command through all three workers, end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_confined_command_runs_through_all_three_workers(sandbox):
    before = _tree(sandbox.home)
    # The command outlives PROXY_START_AFTER: the proxy starts even without a connection.
    r = sandbox.run("--", "sh", "-c", "id -u; ls -A ~; ls -A .; test -e .envrc && echo covered; "
                    "sleep 0.6; echo hi")
    assert "covered" in r.stdout  # positive control: the protection placeholder existed inside
    # ...and nothing is left behind in the project (placeholders removed) or the home.
    assert _tree(sandbox.home) == before
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == str(os.getuid())  # the user's own uid inside
    assert lines[-1] == "hi"
    assert ".ssh" not in r.stdout and ".aws" not in r.stdout  # empty home
    actions = r.actions()
    for needed in ("session-started", "sandbox-network-verified", "command-started", "session-ended"):
        assert needed in actions, actions
    roles = {e.get("agentpen", {}).get("role") for e in r.audit()
             if e["event"]["action"] == "worker-started"}
    assert {"pasta", "proxy", "jail"} <= roles, roles
    setup_senders = {e.get("agentpen", {}).get("worker") for e in r.audit()
                     if e["event"]["action"] == "setup-step"}
    assert setup_senders == {"netns"}, setup_senders


def test_exit_status_is_the_commands_own(sandbox):
    assert sandbox.run("--", "sh", "-c", "exit 7").returncode == 7


def test_death_by_signal_is_128_plus_n(sandbox):
    assert sandbox.run("--", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM


def test_command_not_found_is_127_and_not_executable_126(sandbox):
    r = sandbox.run("--", "definitely-not-a-command-xyz")
    assert r.returncode == 127, r.stderr
    assert "definitely-not-a-command-xyz" in r.stderr and "Traceback" not in r.stderr
    script = sandbox.project / "not-exec.sh"
    script.write_text("#!/bin/sh\necho no\n")
    script.chmod(0o644)
    r = sandbox.run("--", str(script))
    assert r.returncode == 126, r.stderr


def test_bad_input_is_125_with_one_line(sandbox):
    for args in (["--allow", "127.0.0.1", "true"], ["--allow", "localhost", "true"],
                 ["--upstream", "x.example=1.2.3.4", "true"], ["--agent", "nope", "true"],
                 ["--project", str(sandbox.root / "missing"), "true"]):
        r = sandbox.run(*args)
        assert r.returncode == 125, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.strip(), args


def test_project_may_not_be_home_or_root(sandbox):
    assert sandbox.run("--project", str(sandbox.home), "true").returncode == 125
    assert sandbox.run("--project", "/", "true").returncode == 125


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_to_agentpen_reach_the_command(sandbox, sig):
    name = signal.Signals(sig).name[3:]
    marker = f"agentpen-e2e-{os.getpid()}-{time.monotonic_ns()}"
    ready = sandbox.project / "ready"
    audit = sandbox.root / "sig.jsonl"
    script = f"trap 'echo got-term; exit 42' {name}; touch {ready}; while :; do sleep 0.05; done # {marker}"
    p = sandbox.popen("--", "sh", "-c", script, audit=audit, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "command never started"
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.02)
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 42, err
    assert "got-term" in out
    assert not sandbox.leftovers(marker)


def test_supervisor_sigkill_leaves_nothing_behind(sandbox):
    marker = f"agentpen-kill9-{os.getpid()}-{time.monotonic_ns()}"
    ready = sandbox.project / "ready"
    script = f"touch {ready}; while :; do sleep 0.05; done # {marker}"
    audit = sandbox.root / "k.jsonl"
    p = sandbox.popen("--", "sh", "-c", script, audit=audit, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    before = sandbox.leftovers(marker)
    assert before, "positive control: the probe sees the running command"
    worker_pids = [e["process"]["pid"] for e in _lines(audit)
                   if e["event"]["action"] in ("worker-started", "worker-restarted")]
    assert worker_pids and all(os.path.exists(f"/proc/{pid}") for pid in worker_pids)
    p.kill()
    p.wait(10)
    deadline = time.monotonic() + 10
    while sandbox.leftovers(marker) or any(os.path.exists(f"/proc/{pid}") for pid in worker_pids):
        assert time.monotonic() < deadline, (sandbox.leftovers(marker), worker_pids)
        time.sleep(0.05)


def _lines(path):
    import json

    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def test_workers_are_confined_while_the_command_runs(sandbox):
    ready, go = sandbox.project / "ready", sandbox.project / "go"
    audit = sandbox.root / "conf.jsonl"
    p = sandbox.popen("--", "sh", "-c", f"touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done",
                      audit=audit, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() or '"netns-confined"' not in audit.read_text():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        events = _lines(audit)
        netns_pid = next(e["agentpen"]["worker_pid"] for e in events
                         if e["event"]["action"] == "setup-step" and e["agentpen"]["worker"] == "netns")
        while '"role":"proxy"' not in audit.read_text():  # started PROXY_START_AFTER after "go"
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        events = _lines(audit)
        proxy_pid = next(e["process"]["pid"] for e in events if e["event"]["action"] == "worker-started"
                         and e["agentpen"].get("role") == "proxy")
        while _status(proxy_pid)["Seccomp"] != "2":  # it confines itself once its imports are done
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        netns, proxy = _status(netns_pid), _status(proxy_pid)
        # Positive control: the probe reads a real process (our own, unconfined).
        me = _status(os.getpid())
        assert me["Seccomp"] == "0"
        for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
            assert int(netns[k], 16) == 0, (k, netns[k])
        assert netns["NoNewPrivs"] == "1" and netns["Seccomp"] == "2"
        assert proxy["NoNewPrivs"] == "1" and proxy["Seccomp"] == "2"
    finally:
        go.touch()
        p.communicate(timeout=30)
    assert p.returncode == 0


def test_a_program_installed_outside_home_and_the_system_dirs_runs(sandbox):
    """/opt/X, a Homebrew keg...: its install prefix is mounted read-only (it was 127)."""
    prefix = sandbox.root / "opt" / "tool"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "share").mkdir()
    (prefix / "share" / "data").write_text("tool data\n")
    tool = prefix / "bin" / "tool"
    tool.write_text(f"#!/bin/sh\necho tool-ok; cat {prefix}/share/data\n")
    tool.chmod(0o755)
    env = sandbox.env(PATH=f"{prefix / 'bin'}:/usr/bin:/bin")
    r = sandbox.run("tool", env=env)
    assert r.returncode == 0, r.stderr
    assert "tool-ok" in r.stdout and "tool data" in r.stdout
    started = next(e for e in r.audit() if e["event"]["action"] == "session-started")
    assert f"{prefix}:ro" in started["agentpen"]["mounts"]


@pytest.mark.parametrize("how", ["forked", "exec"])
def test_both_ways_of_starting_the_netns_worker_verify_and_run(sandbox, how):
    """Forked from the supervisor into pasta's namespaces (the default: the rtnetlink
    gate, then pyroute2's cross-check), or started by pasta as a new interpreter (the
    fallback: pyroute2 is the gate). Same namespace, same checks, same result."""
    env = sandbox.env(**({"AGENTPEN_NETNS_WORKER": "exec"} if how == "exec" else {}))
    # Two seconds: pyroute2 reads the namespace CROSSCHECK_AFTER (0.25 s) after the jail
    # starts, at nice 19 (docs/netns.md).
    r = sandbox.run("--", "sh", "-c", "sleep 2; echo ok", env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    steps = {e["agentpen"]["step"]: e for e in r.audit() if e["event"]["action"] == "setup-step"}
    assert steps["netns-verified"]["agentpen"]["checked_by"] == ("rtnetlink" if how == "forked"
                                                                else "pyroute2")
    assert steps["netns-verified"]["agentpen"]["network"]["closed"] is True
    if how == "forked":  # pyroute2 confirmed while the command ran
        assert steps["netns-cross-checked"]["agentpen"]["completed"] is True, steps
        assert steps["netns-cross-checked"]["event"]["outcome"] == "success"
    else:
        assert "netns-cross-checked" not in steps


def test_the_proxy_starts_on_the_first_connection_or_soon_after_go(sandbox):
    """Not during the command's own start (issue 10): a command that ends at once and
    connects nowhere never has one; a command that connects at once starts it (and its
    connection is judged and audited like any other)."""
    r = sandbox.run("--", "true")
    assert r.returncode == 0, r.stderr
    roles = {e.get("agentpen", {}).get("role") for e in r.audit() if e["event"]["action"] == "worker-started"}
    assert "proxy" not in roles and {"pasta", "jail"} <= roles, roles
    # Positive control: the first connection starts it at once (the sandbox's own
    # connect() succeeds on the backlog; the ClientHello-less probe is denied and audited).
    probe = ("import socket; s = socket.create_connection(('127.0.0.1', 443), 5); "
             "s.sendall(b'not a hello'); s.recv(1)")
    r = sandbox.run("--", "python3", "-c", probe)
    roles = {e.get("agentpen", {}).get("role") for e in r.audit() if e["event"]["action"] == "worker-started"}
    assert "proxy" in roles, (roles, r.stderr)
    assert "connection-denied" in r.actions(), r.actions()


def test_workers_hold_none_of_the_users_environment(sandbox):
    """The netns worker and the proxy are forks of the supervisor, which has the user's
    whole environment (tokens, keys). Both replace theirs and zero the strings inherited
    from the supervisor's exec (what /proc/PID/environ shows)."""
    secret = f"agentpen-secret-{os.getpid()}-{time.monotonic_ns()}"
    ready, go = sandbox.project / "ready", sandbox.project / "go"
    audit = sandbox.root / "env.jsonl"
    p = sandbox.popen("--", "sh", "-c", f"touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done",
                      audit=audit, env=sandbox.env(AGENTPEN_TEST_SECRET=secret),
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() or '"role":"proxy"' not in audit.read_text():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        events = _lines(audit)
        netns = next(e["agentpen"]["worker_pid"] for e in events
                     if e["event"]["action"] == "setup-step" and e["agentpen"]["worker"] == "netns")
        proxy = next(e["process"]["pid"] for e in events if e["event"]["action"] == "worker-started"
                     and e["agentpen"].get("role") == "proxy")
        nsjoin = int(_status(netns)["PPid"])
        while _status(proxy)["Seccomp"] != "2":  # its start is done (it confines itself last)
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)

        def environ(pid: int) -> bytes:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f.read()

        # Positive control: the probe finds the secret where it is (the supervisor).
        assert secret.encode() in environ(p.pid)
        for role, pid in (("netns worker", netns), ("nsjoin", nsjoin), ("proxy", proxy)):
            assert secret.encode() not in environ(pid), role
    finally:
        go.touch()
        p.communicate(timeout=30)
    assert p.returncode == 0
