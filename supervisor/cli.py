"""`agentpen` entry point: parse, resolve, refuse or run, and exit with the right status."""

from __future__ import annotations

import contextlib
import os
import sys

from agentpen.supervisor.errors import EXIT_AGENTPEN, AgentpenError

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any


def _fail(exc: AgentpenError, log=None) -> int:
    if log is not None:
        log.error(exc.message, fix=exc.fix)
    else:
        line = f"agentpen: {exc.message}"
        if exc.fix:
            line += f" (fix: {exc.fix})"
        print(line, file=sys.stderr)
    return exc.exit_status


_SESSION_RAN = False  # _run finished a session: everything is written and closed


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    try:
        status = _main(argv)
        if as_program and _SESSION_RAN:
            # Every record is on disk, every worker reaped, the guardian released: skip
            # the interpreter's teardown (module and GC finalisation, a preload thread
            # still importing), which only delays the exit the user is waiting for.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(status)
        return status
    except AgentpenError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("agentpen: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for the user; the reason in one line
        print(f"agentpen: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("AGENTPEN_DEBUG"):
            raise
        return EXIT_AGENTPEN


_SUBCOMMANDS = ("audit", "config", "completion", "man")
_NOT_A_SESSION = ("-h", "--help", "--version", "--check")


def _looks_like_a_session(argv: list[str]) -> bool:
    """A cheap guess, before anything is imported: is pasta going to be needed? A wrong
    guess costs two short-lived ``pasta --help/--version`` runs, nothing else."""
    if argv[:1] and argv[0] in _SUBCOMMANDS:
        return False
    own = argv[:argv.index("--")] if "--" in argv else argv
    return not any(a in _NOT_A_SESSION for a in own)


# Options and config keys that change pasta's command line, or where pasta must start
# (inside a session cgroup): with any of them, pasta waits for the parsed options.
_NETWORK_OPTIONS = ("--publish", "--host-port", "--memory", "--max-procs", "--profile")
_NETWORK_CONFIG_WORDS = ("publish", "host_port", "memory", "max_procs", "paranoid")


def _early_network(argv: list[str]) -> Any:
    """pasta, its holder and the forked netns worker, started before the options are even
    parsed when nothing on the command line or in the config file can change pasta's
    command line (no door, no resource cap): the common case, where pasta's namespace
    setup and the worker's then overlap all of our own start (issue 10). None when unsure
    or on any failure: the normal path starts them (and reports what is wrong)."""
    if os.geteuid() == 0:
        return None  # refused later, with the reason
    own = argv[:argv.index("--")] if "--" in argv else argv
    if any(tok.split("=", 1)[0] in _NETWORK_OPTIONS for tok in own):
        return None
    try:
        from agentpen.supervisor.config import config_path

        with open(config_path(os.environ), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    except OSError:
        return None
    if any(word in text for word in _NETWORK_CONFIG_WORDS):
        return None
    try:
        from agentpen.core.policy import Doors
        from agentpen.supervisor.workers import NetnsWorker  # not session.py: ~10 ms less here

        return NetnsWorker.spawn(Doors())
    except Exception:
        return None


def _main(argv: list[str]) -> int:
    if not _looks_like_a_session(argv):
        return _session_main(argv)
    import gc

    # No cyclic garbage collection until the command has started (session.py turns it
    # back on at "go", after gc.freeze()): the start-up allocates some 100,000 objects
    # that live as long as we do, and collecting them over and over, and writing to
    # them in the forked workers' copy-on-write memory, cost ~5 ms (issue 10).
    collecting = gc.isenabled()
    gc.disable()
    from agentpen.workers.netns import probe

    probe.start_early()  # pasta's feature probes run while we import and parse (issue 10)
    early = _early_network(argv)
    try:
        return _session_main(argv, early)
    finally:
        if collecting:
            gc.enable()
        probe.discard()
        if early is not None and not early.handed_over:
            early.abandon()  # the session never started: take pasta and its namespace down


def _session_main(argv: list[str], early: Any = None) -> int:
    from agentpen.supervisor import options

    if argv[:2] == ["audit", "verify"]:
        from agentpen.supervisor.audit import audit_verify_main

        return audit_verify_main(argv[2:])
    if argv[:1] == ["config"]:
        from agentpen.supervisor.show import config_main

        return config_main(argv[1:], os.environ)
    if argv[:1] == ["completion"]:
        from agentpen.supervisor.completion import completion_main

        return completion_main(argv[1:])
    if argv[:1] == ["man"]:
        from agentpen.supervisor.manpage import manpage

        sys.stdout.write(manpage())
        return 0
    opts = options.parse_args(argv, profiles=None)
    if opts.help:
        sys.stdout.write(options.help_text())
        return 0
    if opts.version:
        print(options.version_text())
        return 0
    if opts.check:
        from agentpen.supervisor import check

        layers = check.full_report()
        print(check.render(layers, as_json=opts.json, color=sys.stdout.isatty()))
        return 0 if all(x.ok for x in layers if x.required) else 1

    from agentpen.supervisor import check, paranoid
    from agentpen.supervisor.config import apply_config, load_config
    from agentpen.supervisor.resolve import base_profile, doors_from

    cfg = load_config(os.environ)
    apply_config(opts, cfg, opts.explicit)
    check.preflight()
    # Before the audit stream opens: a bad --memory/--wall-time is a usage error.
    limits = paranoid.limits_from(opts, paranoid=base_profile(opts, cfg) == "paranoid")

    doors = doors_from(opts)
    if early is not None and (limits.memory or limits.max_procs or early.doors != doors):
        early.abandon()  # guessed wrong (_early_network): start again, as below
        early = None
    if early is None and not (limits.memory or limits.max_procs):  # else pasta must start
        # inside the session cgroup. pasta first, from the doors alone: its namespace
        # setup (~30 ms) and the netns worker's overlap the policy's resolution, our
        # imports and the audit setup.
        from agentpen.supervisor.session import start_pasta

        early = start_pasta(doors)
    try:
        from agentpen.supervisor.resolve import resolve_policy

        policy = resolve_policy(opts, os.environ, config=cfg)
        if early is not None:
            early.configure(policy)
        return _run(opts, cfg, policy, limits, early)
    finally:
        if early is not None and not early.handed_over:
            early.abandon()  # the session never started: take pasta and its namespace down


def _run(opts, cfg, policy, limits, early) -> int:
    from agentpen.supervisor import paranoid
    from agentpen.supervisor.audit import AuditStream, open_sinks, setup_console
    from agentpen.supervisor.resolve import state_dir

    # Holding: info lines are printed once the command has started (structlog's import
    # is then off its path); warnings and errors at once (supervisor/audit/console.py).
    log = setup_console(opts.log_format, opts.log_level, hold=True)
    if opts.audit_log and opts.audit_log != "journald":
        _check_audit_not_visible(os.path.abspath(opts.audit_log), policy)
    sdir_state = state_dir(os.environ, policy.home)
    try:
        sinks = open_sinks(opts.audit_log, opts.audit_fd, session_id=policy.session_id,
                           state_dir=sdir_state)
    except AgentpenError as exc:
        return _fail(exc, log)
    except Exception as exc:  # AuditSinkError and OSError: refuse, the audit is not optional
        return _fail(AgentpenError(f"audit sink: {exc}"), log)
    stream = AuditStream(policy.session_id, sinks, chain=opts.audit_chain, failure=opts.audit_failure)
    for sink in sinks:
        log.info("audit log", sink=sink.describe(), session=policy.session_id)
    if cfg.path:
        log.info("config file", path=cfg.path)

    session_dir = None
    start = None
    if limits.rlimits():
        from agentpen.core.record import replace

        policy = replace(policy, rlimits=limits.rlimits())
    if policy.profile == "paranoid":
        try:
            policy, session_dir, start = paranoid.prepare(policy, sdir_state)
        except AgentpenError as exc:
            stream.close()
            return _fail(exc, log)
        except OSError as exc:
            stream.close()
            return _fail(AgentpenError(f"paranoid: cannot prepare the session copy: {exc}",
                                       fix="check $XDG_STATE_HOME/agentpen is writable"), log)
        log.info("paranoid: the agent works on a throwaway copy of the project",
                 copy=policy.project_source, project=policy.project)
    if limits.describe():
        log.info("resource caps", **limits.describe())

    from agentpen.supervisor.session import Session

    enforced = {"filesystem": "bwrap", "seccomp": "pyseccomp", "network": "pasta+nftables",
                "egress": "sni-proxy", "environment": "scrubbed"}
    if policy.learn:
        from agentpen.supervisor import learn

        enforced["egress"] = "sni-proxy LEARN MODE: every name allowed and recorded"
        log.warning(learn.WARNING)
        stream.emit(learn.start_event(policy), sender="supervisor", pid=os.getpid(), durable=True)
    if policy.profile == "paranoid":
        enforced["project"] = f"throwaway copy (paranoid): {policy.project_source}"
        enforced["agent_config"] = ", ".join(f"{m.path} -> {m.source}" for m in policy.mounts
                                             if m.source) or "none"
    cgroup = None
    if limits.describe():
        enforced["limits"] = ", ".join(f"{k}={v}" for k, v in limits.describe().items())
    if limits.memory or limits.max_procs:
        # A total cap over the whole session where the user's cgroup tree is delegated;
        # the per-process rlimits apply either way.
        from agentpen.supervisor.cgroup import NotDelegated, SessionCgroup

        try:
            cgroup = SessionCgroup.create(policy.session_id, memory=limits.memory,
                                          pids=limits.max_procs)
            enforced["cgroup"] = cgroup.describe()
            log.info("resource caps: cgroup v2 for the whole session", path=cgroup.path)
        except NotDelegated as exc:
            enforced["cgroup"] = f"none: {exc}"
            log.info("resource caps: per-process rlimits only (no delegated cgroup v2)",
                     reason=str(exc))
    session = Session(policy, stream, log, enforced=enforced, netns=early)
    if early is not None:
        early.handed_over = True
    timer = paranoid.WallClock(limits.wall_time, session) if limits.wall_time else None
    try:
        try:
            status = session.run()
        finally:
            if timer:
                timer.cancel()  # before anything else: no SIGTERM after the session
        if session.outcome.error:
            log.error(session.outcome.error, fix=session.outcome.fix, exit_status=status)
        paranoid.audit_limits(stream, log, limits, session, timer, cgroup)
    finally:
        if cgroup is not None:
            cgroup.close()
    if policy.learn:
        from agentpen.supervisor import learn

        print(learn.summary(session.learned, policy.agent, cfg.path), file=sys.stderr)
    if session_dir is not None:
        paranoid.finish(policy, session_dir, opts, stream, log, start)
    log.release()  # the command may never have started
    stream.close()
    global _SESSION_RAN
    _SESSION_RAN = True
    return status


def _check_audit_not_visible(path: str, policy) -> None:
    """The audit log must never be inside anything the sandbox can see."""
    from agentpen.supervisor.errors import UsageError

    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    # $HOME is an empty tmpfs inside, so only the project and the mounts are visible.
    for root in [policy.project, *(m.path for m in policy.mounts)]:
        if real == root or real.startswith(root.rstrip("/") + "/"):
            raise UsageError(f"audit log {path} is inside {root}, which the sandbox can see; "
                             "choose a path outside the project and mounts")
