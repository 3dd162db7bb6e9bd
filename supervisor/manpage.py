"""`agentpen man`: the man page (roff, section 1) generated from the parser's option
definitions and the help text, so it says what the code accepts."""

from __future__ import annotations

import datetime

from agentpen.core import __version__


def _esc(text: str) -> str:
    """Plain text -> roff: backslashes, hyphens, and lines starting with . or '."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in text.split("\n"))


def manpage(today: datetime.date | None = None) -> str:
    from agentpen.supervisor.completion import SUBCOMMANDS, option_specs
    from agentpen.supervisor.options import EXAMPLES, build_parser

    parser = build_parser()
    date = (today or datetime.date.today()).isoformat()
    out = [
        f'.TH AGENTPEN 1 "{date}" "agentpen {__version__}" "User Commands"',
        ".SH NAME",
        "agentpen \\- run an LLM coding agent (or any command) confined",
        ".SH SYNOPSIS",
        ".B agentpen",
        "[\\fIOPTIONS\\fR] [\\fB\\-\\-\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR...]",
        ".br",
        ".B agentpen config show",
        "[\\fB\\-\\-json\\fR] [\\fIOPTIONS\\fR] [\\fB\\-\\-\\fR] [\\fICOMMAND\\fR...]",
        ".br",
        ".B agentpen completion",
        "\\fBbash\\fR|\\fBzsh\\fR|\\fBfish\\fR",
        ".br",
        ".B agentpen audit verify",
        "\\fIFILE\\fR",
        ".br",
        ".B agentpen man",
        ".SH DESCRIPTION",
        _esc(parser.description or ""),
        ".PP",
        "The first word that is not an option starts the command; everything after it is the "
        "command's own.",
        ".SH OPTIONS",
    ]
    for o in option_specs(parser):
        names = ", ".join(f"\\fB{_esc(f)}\\fR" for f in o.flags)
        if o.takes_value:
            names += f" \\fI{_esc(o.metavar)}\\fR"
        out += [".TP", names]
        text = o.help or ""
        if o.choices and o.long != "--profile":  # profiles: also the config file's
            text = (text.rstrip(".") + ". " if text else "") + f"One of: {', '.join(o.choices)}."
        out.append(_esc(text))
    out.append(".SH SUBCOMMANDS")
    for name, what in SUBCOMMANDS.items():
        out += [".TP", f"\\fB{name}\\fR", _esc(what)]
    examples, _, status = EXAMPLES.partition("exit status:")
    examples = examples.partition("\nconfig:")[0]
    out += [".SH EXIT STATUS", _esc(status.strip()), ".SH FILES", ".TP",
            "\\fI$XDG_CONFIG_HOME/agentpen/config.toml\\fR",
            _esc("defaults, per-agent hosts/env/mounts, extra agents and profiles; command line > "
                 "config file > built-in."),
            ".TP", "\\fI$XDG_STATE_HOME/agentpen/audit/\\fR",
            _esc("the per-session audit streams (JSON lines, ECS)."),
            ".TP", "\\fI$XDG_STATE_HOME/agentpen/sessions/\\fR",
            _esc("paranoid sessions' throwaway project copies (0700)."),
            ".SH EXAMPLES", ".nf"]
    for line in examples.splitlines()[1:]:
        out.append(_esc(line))
    out += [".fi", ".SH SEE ALSO", "\\fBbwrap\\fR(1), \\fBpasta\\fR(1), \\fBnft\\fR(8)", ""]
    return "\n".join(out)
