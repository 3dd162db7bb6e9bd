"""`agentpen completion bash|zsh|fish`: completion scripts generated from the same
option definitions as the parser (options.build_parser()), so they cannot drift."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from agentpen.supervisor.errors import UsageError

SUBCOMMANDS = {
    "config": "show the effective policy for a command (config show)",
    "audit": "verify an audit log's hash chain (audit verify FILE)",
    "completion": "print a shell completion script (bash, zsh, fish)",
    "man": "print the man page (roff)",
}
PATH_METAVARS = {"PATH", "DIR"}


@dataclass(frozen=True)
class Opt:
    flags: tuple[str, ...]
    takes_value: bool
    metavar: str
    choices: tuple[str, ...]
    help: str
    repeatable: bool = False

    @property
    def long(self) -> str:
        return next(f for f in self.flags if f.startswith("--"))

    @property
    def short(self) -> str | None:
        return next((f for f in self.flags if not f.startswith("--")), None)

    @property
    def is_path(self) -> bool:
        return self.metavar in PATH_METAVARS


def option_specs(parser: argparse.ArgumentParser | None = None) -> list[Opt]:
    from agentpen.supervisor.options import PROFILES, build_parser

    parser = parser or build_parser()
    out = []
    for a in parser._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS:
            continue
        takes = a.nargs != 0
        choices = tuple(a.choices) if a.choices else ()
        if a.dest == "profile":
            choices = PROFILES
        metavar = a.metavar if isinstance(a.metavar, str) else (a.dest.upper() if takes else "")
        out.append(Opt(tuple(a.option_strings), takes, metavar, choices, a.help or "",
                       isinstance(a, argparse._AppendAction)))
    return out


def _sq(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def bash() -> str:
    opts = option_specs()
    words = " ".join(f for o in opts for f in o.flags)
    value_cases = []
    for o in opts:
        if not o.takes_value:
            continue
        pat = "|".join(o.flags)
        if o.choices:
            value_cases.append(f'        {pat}) COMPREPLY=($(compgen -W "{" ".join(o.choices)}" -- "$cur")); '
                               "return ;;")
        elif o.is_path:
            value_cases.append(f'        {pat}) COMPREPLY=($(compgen -f -- "$cur")); return ;;')
        else:
            value_cases.append(f"        {pat}) return ;;")
    takes = " ".join(f for o in opts if o.takes_value for f in o.flags)
    return f"""# bash completion for agentpen (generated from its option definitions)
_agentpen() {{
    local cur prev i cmd_at=0
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
{chr(10).join(value_cases)}
    esac
    # Where does the command start? The first word that is not an option or a value.
    i=1
    while [ $i -lt $COMP_CWORD ]; do
        case "${{COMP_WORDS[i]}}" in
            --) cmd_at=$((i+1)); break ;;
            {"|".join(takes.split())}) i=$((i+2)); continue ;;
            -*) i=$((i+1)); continue ;;
            *) cmd_at=$i; break ;;
        esac
    done
    if [ $cmd_at -gt 0 ] && [ $cmd_at -lt $COMP_CWORD ]; then
        case "${{COMP_WORDS[cmd_at]}}" in
            completion) COMPREPLY=($(compgen -W "bash zsh fish" -- "$cur")); return ;;
            config) COMPREPLY=($(compgen -W "show" -- "$cur")); return ;;
            audit) COMPREPLY=($(compgen -W "verify" -- "$cur")); return ;;
        esac
        COMPREPLY=($(compgen -f -- "$cur"))  # the command's own arguments
        return
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "{words} --" -- "$cur"))
    else
        COMPREPLY=($(compgen -c -W "{" ".join(SUBCOMMANDS)}" -- "$cur"))
    fi
}}
complete -F _agentpen agentpen
"""


def _zsh_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]") \
        .replace(":", "\\:")


def zsh() -> str:
    specs = []
    for o in option_specs():
        desc = _zsh_escape(o.help.split(";")[0][:80])
        excl = f"({' '.join(o.flags)})" if len(o.flags) > 1 else ""
        repeat = "*" if o.repeatable else ""
        names = "{" + ",".join(o.flags) + "}" if len(o.flags) > 1 else o.flags[0]
        if o.takes_value:
            action = (f"({' '.join(o.choices)})" if o.choices else "_files" if o.is_path else " ")
            specs.append(f"    '{excl}{repeat}'{names}'[{desc}]:{_zsh_escape(o.metavar.lower())}:{action}'")
        else:
            specs.append(f"    '{excl}'{names}'[{desc}]'")
    subs = " ".join(f"'{k}:{_zsh_escape(v)}'" for k, v in SUBCOMMANDS.items())
    joined = " \\\n".join(specs)
    return f"""#compdef agentpen
# zsh completion for agentpen (generated from its option definitions)
_agentpen() {{
  local -a subcommands
  subcommands=({subs})
  _arguments -S -A '-*' \\
{joined} \\
    '1: :->first' \\
    '*:: :->rest'
  case $state in
    first) _alternative 'subcommands:subcommand:(({" ".join(f"{k}" for k in SUBCOMMANDS)}))' \\
             'commands:command:_command_names -e' ;;
    rest)
      case $words[1] in
        completion) _values shell bash zsh fish ;;
        config) _values subcommand show ;;
        audit) _values subcommand verify ;;
        *) _normal ;;
      esac ;;
  esac
}}
_agentpen "$@"
"""


def fish() -> str:
    lines = ["# fish completion for agentpen (generated from its option definitions)",
             "function __agentpen_no_command",
             "    set -l toks (commandline -opc)",
             "    set -e toks[1]",
             "    set -l skip 0",
             "    for t in $toks",
             "        if test $skip -eq 1; set skip 0; continue; end",
             "        switch $t",
             "            case " + " ".join(f"'{f}'" for o in option_specs() if o.takes_value
                                          for f in o.flags),
             "                set skip 1",
             "            case '--'",
             "                return 1",
             "            case '-*'",
             "            case '*'",
             "                return 1",
             "        end",
             "    end",
             "    return 0",
             "end",
             "complete -c agentpen -f -n __agentpen_no_command -a '(__fish_complete_command)'"]
    for k, v in SUBCOMMANDS.items():
        lines.append(f"complete -c agentpen -f -n __agentpen_no_command -a {k} -d {_sq(v)}")
    lines.append("complete -c agentpen -f -n '__fish_seen_subcommand_from completion' -a 'bash zsh fish'")
    for o in option_specs():
        parts = ["complete -c agentpen -n __agentpen_no_command", f"-l {o.long[2:]}"]
        if o.short:
            parts.append(f"-s {o.short[1:]}")
        if o.takes_value:
            parts.append("-r" if not o.is_path else "-r -F")
            if o.choices:
                parts.append(f"-f -a {_sq(' '.join(o.choices))}")
        parts.append(f"-d {_sq(o.help.split(';')[0][:80])}")
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


SHELLS = {"bash": bash, "zsh": zsh, "fish": fish}


def completion_main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SHELLS:
        raise UsageError("usage: agentpen completion bash|zsh|fish (e.g. agentpen completion bash "
                         "> ~/.local/share/bash-completion/completions/agentpen)")
    sys.stdout.write(SHELLS[argv[0]]())
    return 0
