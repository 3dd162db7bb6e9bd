"""Options + host facts -> SessionPolicy. Pure apart from reading the filesystem and
the user database; every refusal is a UsageError / CommandNotFound with one line."""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
from collections.abc import Mapping

from agentpen.core.policy import Doors, Mount, Publish, SessionPolicy, Upstream
from agentpen.supervisor.config import Config, registry_extra
from agentpen.supervisor.errors import (
    CommandNotExecutable,
    CommandNotFound,
    UsageError,
)
from agentpen.supervisor.options import Options

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def uuid4() -> str:
    """A random (version 4) UUID string, as str(uuid.uuid4()): the uuid module imports
    platform, ~2.5 ms of every start-up for one call (issue 10)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def state_dir(env: Mapping[str, str], home: str) -> str:
    base = env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "agentpen")


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"{what}: port {port} is out of range 1-65535")
    return port


def parse_upstream(spec: str) -> tuple[str, str, int]:
    """HOST=ADDR:PORT with ADDR an IP literal ([v6] bracketed)."""
    host, sep, target = spec.partition("=")
    if not sep or not host or not target:
        raise UsageError(f"--upstream {spec!r}: expected HOST=ADDR:PORT")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", target)
    if not m:
        raise UsageError(f"--upstream {spec!r}: ADDR:PORT must be an IP address and a port "
                         "(IPv6 in brackets: [2001:db8::1]:443)")
    addr = m.group(1) or m.group(3)
    try:
        addr = str(ipaddress.ip_address(addr))
    except ValueError:
        raise UsageError(f"--upstream {spec!r}: {addr!r} is not an IP address") from None
    port = _port(m.group(2) or m.group(4), f"--upstream {spec!r}")
    return host, addr, port


def parse_publish(spec: str) -> Publish:
    host, _, inner = spec.partition(":")
    hp = _port(host, f"--publish {spec!r}")
    return Publish(hp, _port(inner, f"--publish {spec!r}") if inner else hp)


def base_profile(opts: Options, config: Config | None) -> str:
    """The built-in profile a run is based on (a config profile names its base)."""
    config = config or Config()
    return config.base_profile(opts.profile) if opts.profile in config.profile_names() else opts.profile


def doors_from(opts: Options) -> Doors:
    """The doors alone, as resolve_policy() will set them: pasta starts from these."""
    return Doors(publish=tuple(parse_publish(p) for p in opts.publish),
                 host_ports=tuple(_port(p, "--host-port") for p in opts.host_port))


def resolve_policy(opts: Options, env: Mapping[str, str], *, cwd: str | None = None,
                   config: Config | None = None, dry_run: bool = False) -> SessionPolicy:
    """`config`: the loaded config file (already merged into `opts` by apply_config;
    here for its [agents.*] tables). `dry_run`: create nothing (for `config show`)."""
    from agentpen.workers.jail import registry as agent_registry
    from agentpen.workers.jail import resolve as command_resolve
    from agentpen.workers.jail.env import scrub_env
    from agentpen.workers.proxy.allowlist import normalize_allow_entry

    uid, gid = os.getuid(), os.getgid()
    pw = pwd.getpwuid(uid)
    home = os.path.realpath(env.get("HOME") or pw.pw_dir)
    user = pw.pw_name
    sdir = state_dir(env, home)

    config = config or Config()
    profile = base_profile(opts, config)
    if profile not in ("untrusted", "paranoid"):
        raise UsageError(f"--profile {opts.profile}: unknown profile "
                         f"(known: {', '.join(config.profile_names())})")
    if profile != "paranoid":
        for flag, given in (("--apply", opts.apply), ("--discard", opts.discard)):
            if given:
                raise UsageError(f"{flag} only goes with --profile paranoid (or a profile based on it)")

    # -- project ---------------------------------------------------------------
    project_arg = opts.project or cwd or os.getcwd()
    project = os.path.realpath(project_arg)
    if not os.path.isdir(project):
        raise UsageError(f"--project {project_arg}: not a directory")
    if project == "/":
        raise UsageError("refusing to use / as the project directory (it would be writable)")
    if _is_within(home, project):
        raise UsageError(f"refusing project {project}: it is or contains your home directory "
                         "(cd into a repository, or pass --project DIR)")
    if _is_within(sdir, project) or _is_within(project, sdir):
        raise UsageError(f"refusing project {project}: it overlaps agentpen's state directory {sdir}")

    # -- agent -----------------------------------------------------------------
    try:
        registry = agent_registry.load_registry(extra=registry_extra(config))
    except agent_registry.RegistryError as exc:
        raise UsageError(f"config {config.path}: {exc}") from None
    command_name = opts.command[0]
    if opts.agent is not None:
        if opts.agent not in registry:
            known = ", ".join(sorted(registry))
            raise UsageError(f"--agent {opts.agent}: unknown agent (known: {known})")
        agent = opts.agent
    else:
        agent = agent_registry.agent_for_command(os.path.basename(command_name), registry)
    spec = registry.get(agent) if agent else None

    # -- allowlist ---------------------------------------------------------------
    allow: list[str] = []
    seen: set[str] = set()
    for entry in [*(spec.hosts if spec else []), *opts.allow]:
        try:
            norm = normalize_allow_entry(entry)
        except ValueError as exc:
            raise UsageError(f"--allow {entry!r}: {exc}") from None
        if norm not in seen:  # a set beside the list: 10,000 entries stay linear
            seen.add(norm)
            allow.append(norm)

    upstreams: list[Upstream] = []
    for item in opts.upstream:
        host, addr, port = parse_upstream(item)
        try:
            host = normalize_allow_entry(host)
        except ValueError as exc:
            raise UsageError(f"--upstream {item!r}: {exc}") from None
        if host.startswith("*."):
            raise UsageError(f"--upstream {item!r}: a pin names one host, not a wildcard")
        if host not in seen and not opts.learn:
            # Learn mode allows every name anyway: a pin for a name outside the
            # allowlist is how a private upstream is observed before it is admitted.
            raise UsageError(f"--upstream {item!r}: {host} is not allowed; add --allow {host}")
        upstreams.append(Upstream(host, addr, port))

    # -- command -----------------------------------------------------------------
    try:
        resolved = command_resolve.resolve_command(command_name, env.get("PATH", ""), home)
    except command_resolve.CommandNotFound as exc:
        raise CommandNotFound(str(exc)) from None
    except command_resolve.CommandNotExecutable as exc:
        raise CommandNotExecutable(str(exc)) from None

    # -- mounts ----------------------------------------------------------------------
    # agentpen's own: the state (audit logs, paranoid sessions) and the config directory
    # (a sandbox that could write config.toml would widen every later session).
    from agentpen.supervisor.config import config_path

    runtime_paths = [sdir, os.path.dirname(config_path(env, home))]
    mounts: list[Mount] = []

    def add_mount(path: str, mode: str, why: str, *, must_exist: bool = True) -> None:
        real = os.path.realpath(os.path.expanduser(path))
        if not os.path.exists(real):
            if must_exist:
                raise UsageError(f"mount {path}: no such file or directory")
            return
        if real == "/":
            raise UsageError(f"mount {path}: refusing to expose /")
        if _is_within(home, real):
            raise UsageError(f"mount {path}: refusing to expose your home directory itself")
        for rp in runtime_paths:
            if _is_within(real, rp) or _is_within(rp, real):
                raise UsageError(f"mount {path}: refusing to expose agentpen's own state ({rp})")
        mounts.append(Mount(real, mode, why))  # type: ignore[arg-type]

    for m in resolved.mounts:
        add_mount(m.path, m.mode, m.why or "the command's installation")
    if spec:
        for cm in spec.home_mounts(home):
            # An agent's state directory must persist across runs: create it (0700) the
            # first time rather than let the agent write into the throwaway tmpfs home.
            if cm.mode == "rw" and not os.path.lexists(cm.path):
                if dry_run:  # `config show`: say what the first run would create and mount
                    if cm.path.endswith(".json") or not os.path.splitext(cm.path)[1]:
                        mounts.append(Mount(os.path.abspath(cm.path), cm.mode,
                                            (cm.why or f"{agent} configuration")
                                            + " (created at the first run)"))
                    continue
                _create_state_path(cm.path)
            add_mount(cm.path, cm.mode, cm.why or f"{agent} configuration", must_exist=False)
    for path in opts.mount:
        add_mount(path, "ro", "--mount")
    for path in opts.mount_rw:
        add_mount(path, "rw", "--mount-rw")

    # -- environment -----------------------------------------------------------------
    extra_env = []
    for name in opts.env:
        if not _ENV_NAME.match(name):
            raise UsageError(f"--env {name!r}: not a variable name")
        if name not in env:
            raise UsageError(f"--env {name}: {name} is not set in this environment")
        extra_env.append(name)
    sandbox_env = scrub_env(
        env,
        home=home,
        user=user,
        shell=pw.pw_shell or "/bin/sh",
        path_dirs=resolved.path_dirs,
        passthrough=spec.env if spec else (),
        extra=extra_env,
    )
    if "GIT_CONFIG_COUNT" not in sandbox_env:
        sandbox_env.update(git_identity_env(env))

    for p in opts.protect:
        if os.path.isabs(p):
            rp = os.path.realpath(p)
            if not _is_within(rp, project):
                raise UsageError(f"--protect {p}: not inside the project {project}")
            p = os.path.relpath(rp, project)
        if p.startswith("..") or p in ("", "."):
            raise UsageError(f"--protect {p!r}: must name a path inside the project")

    return SessionPolicy(
        session_id=uuid4(),
        profile=profile,  # type: ignore[arg-type]
        profile_name=opts.profile,
        learn=bool(opts.learn),
        agent=agent,
        project=project,
        command=[resolved.path, *opts.command[1:]],
        command_name=command_name,
        allow=allow,
        upstreams=upstreams,
        env=sandbox_env,
        mounts=mounts,
        protect=list(opts.protect),
        unprotect=list(opts.unprotect),
        publish=[parse_publish(p) for p in opts.publish],
        host_ports=[_port(p, "--host-port") for p in opts.host_port],
        uid=uid,
        gid=gid,
        user=user,
        home=home,
        runtime_paths=runtime_paths,
    )



def _create_state_path(path: str) -> None:
    """A missing rw agent path: a directory (0700), or for a *.json file an empty JSON
    object (0600) so the agent parses it; other files are left to the agent (unmounted)."""
    if path.endswith(".json"):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("{}\n")
    elif not os.path.splitext(os.path.basename(path))[1]:
        os.makedirs(path, mode=0o700, exist_ok=True)


def git_identity_env(env: Mapping[str, str]) -> dict[str, str]:
    """The user's git name and e-mail (and nothing else of ~/.gitconfig, which the sandbox
    cannot see) as GIT_CONFIG_* variables, so `git commit` works inside and tools that ask
    `git config user.name` get an answer instead of writing the read-only .git/config."""
    import subprocess

    from agentpen.core.which import which

    git = which("git", path=env.get("PATH") or None)
    if not git:
        return {}
    try:
        out = subprocess.run(
            [git, "config", "--global", "--get-regexp", r"^user\.(name|email)$"],
            capture_output=True, text=True, timeout=5, check=False,
            env={"HOME": env.get("HOME", ""), "PATH": env.get("PATH", "/usr/bin:/bin"),
                 **({"XDG_CONFIG_HOME": env["XDG_CONFIG_HOME"]} if "XDG_CONFIG_HOME" in env else {})},
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    pairs = []
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key in ("user.name", "user.email") and value and "\n" not in value:
            pairs.append((key, value))
    result: dict[str, str] = {}
    for i, (key, value) in enumerate(pairs):
        result[f"GIT_CONFIG_KEY_{i}"] = key
        result[f"GIT_CONFIG_VALUE_{i}"] = value
    if pairs:
        result["GIT_CONFIG_COUNT"] = str(len(pairs))
    return result
