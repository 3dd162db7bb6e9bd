"""Command-line contract: `agentpen [OPTIONS] [--] COMMAND [ARGS...]`.

The first word that is not an option starts the command; everything after it is the
command's own (`agentpen claude --resume` passes `--resume` to claude). Parsing is
pure: it returns Options or raises UsageError, never exits and never prints.
"""

from __future__ import annotations

import argparse

from agentpen.core import __version__
from agentpen.core.record import field, fields, record
from agentpen.supervisor.errors import UsageError

EXAMPLES = """\
examples:
  agentpen claude                          run Claude Code confined to the current directory
  agentpen --log-format json claude        agentpen's own messages as JSON lines on stderr
  agentpen --audit-log /var/log/agentpen/me.jsonl codex
                                           choose where the audit stream goes (JSON lines, ECS)
  agentpen --audit-fd 3 claude 3> >(vector --config docs/siem/vector.toml)
                                           pipe the audit stream into Vector / Fluent Bit
  agentpen --allow '*.example.com' -- sh -c 'curl https://api.example.com'
                                           admit a wildcard (subdomains only) for a plain command
  agentpen --allow llm.corp --upstream llm.corp=10.0.0.5:443 aider
                                           reach a private LLM gateway (only way to dial a private address)
  agentpen --learn claude                  egress open, but list the names it needed (then --allow them)
  agentpen --profile paranoid claude       work on a throwaway copy; apply or discard at the end
  agentpen config show claude              the effective policy for a command, without running it
  agentpen --check                         report which confinement layers this host can enforce
  agentpen completion bash|zsh|fish        shell completion script; agentpen man: the man page
  agentpen audit verify FILE               check the hash chain of an --audit-chain log

config: $XDG_CONFIG_HOME/agentpen/config.toml (defaults, agents, profiles); see docs/config.md.

exit status: the command's own; 128+N if it died of signal N; 125 agentpen failed;
126 command not executable; 127 command not found.
"""

LOG_LEVELS = ("debug", "info", "warning", "error")


@record
class Options:
    command: list[str] = field(default_factory=list)
    profile: str = "untrusted"
    agent: str | None = None
    allow: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    mount: list[str] = field(default_factory=list)
    mount_rw: list[str] = field(default_factory=list)
    protect: list[str] = field(default_factory=list)
    unprotect: list[str] = field(default_factory=list)
    publish: list[str] = field(default_factory=list)
    host_port: list[str] = field(default_factory=list)
    project: str | None = None
    log_format: str | None = None
    log_level: str = "info"
    audit_log: str | None = None
    audit_fd: int | None = None
    audit_failure: str = "deny"
    audit_chain: bool = False
    learn: bool = False
    memory: str | None = None
    max_procs: int | None = None
    cpu_time: str | None = None
    wall_time: str | None = None
    apply: bool = False
    discard: bool = False
    check: bool = False
    json: bool = False
    version: bool = False
    help: bool = False
    explicit: set[str] = field(default_factory=set)  # options given on the command line


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse makes a formatter for every add_argument() (to check the help string),
    and each asked the terminal for its width, importing shutil the first time: ~3 ms
    of every start (issue 10). The width is asked once, as shutil would ($COLUMNS, then
    standard output's terminal, then 80 columns)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width or _help_width())


_width: list[int] = []


def _help_width() -> int:
    if not _width:
        import os
        import sys

        try:
            columns = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                columns = 0
        _width.append((columns or 80) - 2)  # what argparse subtracts
    return _width[0]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        raise UsageError(message or f"argument parsing ended with status {status}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="agentpen",
        usage="agentpen [OPTIONS] [--] COMMAND [ARGS...]",
        description=(
            "Run an LLM coding agent (or any command) confined: empty $HOME, only the project "
            "directory writable, scrubbed environment, seccomp, and no network but an SNI-gated "
            "TLS passthrough proxy to the allowed hosts."
        ),
        epilog=EXAMPLES,
        formatter_class=_Formatter,
        add_help=False,
        allow_abbrev=False,
    )
    a = p.add_argument
    a("-h", "--help", action="store_true", help="show this help and exit")
    a("--version", action="store_true", help="print the version and exit")
    a("--profile", metavar="NAME", default="untrusted",
      help="confinement profile: untrusted (default), paranoid (throwaway copy of the project, "
           "resource caps, read-only agent config), or one defined in the config file")
    a("--agent", metavar="NAME", help="agent registry entry (default: from the command's name)")
    a("--allow", metavar="HOST", action="append", default=[],
      help="also allow TLS to HOST; '*.example.com' matches subdomains only (repeatable)")
    a("--upstream", metavar="HOST=ADDR:PORT", action="append", default=[],
      help="dial ADDR:PORT for HOST instead of resolving it; the only way to reach a private "
           "or loopback upstream (repeatable)")
    a("--env", metavar="VAR", action="append", default=[],
      help="pass the host's VAR into the sandbox (repeatable)")
    a("--mount", metavar="PATH", action="append", default=[], help="make PATH visible read-only")
    a("--mount-rw", metavar="PATH", action="append", default=[], help="make PATH visible read-write")
    a("--protect", metavar="PATH", action="append", default=[],
      help="keep a project path read-only (added to the built-in persistence list)")
    a("--unprotect", metavar="PATH", action="append", default=[],
      help="lift one built-in protected project path (audited)")
    a("--publish", metavar="PORT[:SANDBOX_PORT]", action="append", default=[],
      help="the host's 127.0.0.1:PORT reaches a port the sandbox listens on")
    a("--host-port", metavar="PORT", action="append", default=[],
      help="the sandbox may reach the host's loopback PORT")
    a("--project", metavar="DIR", help="the one writable directory (default: current directory)")
    a("--log-format", choices=("console", "json"),
      help="agentpen's own messages on stderr (default: console on a TTY, json otherwise)")
    a("--log-level", choices=LOG_LEVELS, default="info")
    a("--audit-log", metavar="PATH",
      help="audit stream file, or 'journald' (default: a per-session file under "
           "$XDG_STATE_HOME/agentpen/audit/)")
    a("--audit-fd", metavar="N", type=_fd, help="also write the audit stream to descriptor N")
    a("--audit-failure", choices=("halt", "deny", "continue"), default="deny",
      help="when the audit sink fails: stop the session, refuse new connections (default), or go on")
    a("--audit-chain", action="store_true", help="chain audit lines with SHA-256 (see 'audit verify')")
    a("--learn", action="store_true",
      help="egress OPEN: allow every name but record the ones the profile would block, and "
           "print the --allow flags that would admit them (filesystem and seccomp stay on)")
    a("--memory", metavar="SIZE", help="cap each process's data memory (RLIMIT_DATA), e.g. 4G (paranoid "
      "default: 8G)")
    a("--max-procs", metavar="N", type=_positive, help="cap the number of processes (paranoid "
      "default: 512)")
    a("--cpu-time", metavar="DURATION", help="cap CPU seconds per process, e.g. 30m (paranoid "
      "default: 2h)")
    a("--wall-time", metavar="DURATION", help="end the command after DURATION of wall-clock time, "
      "e.g. 90m (paranoid default: 4h)")
    a("--apply", action="store_true", help="paranoid: apply the project changes without asking")
    a("--discard", action="store_true", help="paranoid: discard the project changes without asking")
    a("--check", action="store_true", help="report which layers this host can enforce, then exit")
    a("--json", action="store_true", help="with --check: machine-readable output")
    a("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _fd(text: str) -> int:
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a descriptor number: {text!r}") from None
    if fd < 0:
        raise argparse.ArgumentTypeError(f"not a descriptor number: {text!r}")
    return fd


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return n


PROFILES = ("untrusted", "paranoid")


def split_repeated(parser: argparse.ArgumentParser,
                   argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Take the repeatable options (`--allow HOST`, `--env VAR`, ...) out of the options
    before the command, in order, and leave the rest to argparse: CPython 3.11's argparse
    is quadratic in the number of options (5.5 s for 10,000 `--allow`). Anything unusual
    (a missing value, one that looks like an option) stays for argparse to judge."""
    table = parser._option_string_actions
    rest: list[str] = []
    taken: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--" or not tok.startswith("-") or tok == "-":
            break  # the command starts: everything from here passes through untouched
        name, eq, val = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        action = table.get(name)
        takes_value = action is not None and action.nargs != 0
        if isinstance(action, argparse._AppendAction) and action.nargs is None:
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                eq, val, i = "=", argv[i + 1], i + 1
            if eq:
                taken.setdefault(action.dest, []).append(val)
                i += 1
                continue
        rest.append(tok)
        if takes_value and not eq and i + 1 < len(argv):
            rest.append(argv[i + 1])
            i += 1
        i += 1
    return rest + argv[i:], taken


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    rest, taken = split_repeated(parser, argv)
    ns = parser.parse_args(rest)
    for dest, values in taken.items():
        setattr(ns, dest, [*(getattr(ns, dest, None) or []), *values])
    return ns


def explicit_options(argv: list[str], parser: argparse.ArgumentParser | None = None) -> set[str]:
    """The option names (dests) given on the command line, before the command. Changes
    ``parser``'s defaults when given one (parse_args passes its own, already used)."""
    parser = parser or build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    ns = _parse(parser, argv)
    return {k for k in vars(ns) if k != "command"}


def parse_args(argv: list[str], *, profiles: tuple[str, ...] | None = PROFILES,
               need_command: bool = True) -> Options:
    parser = build_parser()
    ns = _parse(parser, argv)
    opts = Options(**{k: v for k, v in vars(ns).items() if k in fields(Options)})
    opts.explicit = explicit_options(argv, parser)  # the same parser: built once
    if profiles is not None and opts.profile not in profiles:
        raise UsageError(f"--profile {opts.profile}: unknown profile (known: {', '.join(profiles)}; "
                         "more can be defined under [profiles.NAME] in the config file)")
    if opts.apply and opts.discard:
        raise UsageError("--apply and --discard exclude each other")
    cmd = list(ns.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    opts.command = cmd
    if need_command and not cmd and not (opts.check or opts.version or opts.help):
        raise UsageError("no command given (try: agentpen claude, or agentpen --help)")
    if opts.json and not opts.check and need_command:
        raise UsageError("--json only goes with --check (and agentpen config show)")
    return opts


def help_text() -> str:
    return build_parser().format_help()


def version_text() -> str:
    return f"agentpen {__version__}"
