"""Issue 9: completion scripts and the man page come from the parser's own option
definitions (supervisor/completion.py, supervisor/manpage.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from agentpen.supervisor import completion, manpage
from agentpen.supervisor.errors import UsageError
from agentpen.supervisor.options import build_parser


def _all_long_flags() -> set[str]:
    return {f for a in build_parser()._actions for f in a.option_strings if f.startswith("--")}


def test_specs_cover_every_option_of_the_parser():
    flags = {o.long for o in completion.option_specs()}
    assert flags == _all_long_flags()
    assert {"--learn", "--profile", "--allow", "--apply", "--wall-time"} <= flags
    by = {o.long: o for o in completion.option_specs()}
    assert by["--log-level"].choices == ("debug", "info", "warning", "error")
    assert by["--mount"].is_path and by["--mount"].repeatable and not by["--learn"].takes_value


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_every_flag_is_in_every_script(shell):
    text = completion.SHELLS[shell]()
    for flag in _all_long_flags():
        needle = f"-l {flag[2:]} " if shell == "fish" else flag
        assert needle in text, (shell, flag)


def _bash_complete(script: str, words: list[str]) -> list[str]:
    prog = (script + "\nCOMP_WORDS=(" + " ".join(f"'{w}'" for w in words) + ")\n"
            f"COMP_CWORD={len(words) - 1}\n_agentpen\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    out = subprocess.run(["bash", "--norc", "-c", prog], capture_output=True, text=True, check=True,
                         timeout=20)
    return out.stdout.split()


def test_bash_completes_options_values_and_stops_at_the_command():
    script = completion.bash()
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert _bash_complete(script, ["agentpen", "--le"]) == ["--learn"]
    assert sorted(_bash_complete(script, ["agentpen", "--profile", ""])) == ["paranoid", "untrusted"]
    assert _bash_complete(script, ["agentpen", "--audit-failure", "h"]) == ["halt"]
    assert _bash_complete(script, ["agentpen", "completion", "z"]) == ["zsh"]
    # after the command, its own arguments: agentpen's options are not offered
    assert "--learn" not in _bash_complete(script, ["agentpen", "--allow", "x.example", "sh", "--le"])
    # a value-taking option's value is not mistaken for the command (positive control above)
    assert _bash_complete(script, ["agentpen", "--allow", "x.example", "--le"]) == ["--learn"]


def test_zsh_script_parses():
    zsh = shutil.which("zsh")
    if not zsh:
        pytest.skip("zsh not installed (apt-get install zsh)")
    text = completion.zsh()
    assert text.startswith("#compdef agentpen")
    subprocess.run([zsh, "-n"], input=text, text=True, check=True)
    assert "'*'--allow'" in text and ":(untrusted paranoid)" in text  # repeatable, choices


def test_fish_completes():
    fish = shutil.which("fish")
    if not fish:
        pytest.skip("fish not installed (apt-get install fish)")
    text = completion.fish()
    subprocess.run([fish, "-n"], input=text, text=True, check=True)

    def comp(line: str) -> list[str]:
        out = subprocess.run([fish, "--no-config", "-c", "source; complete -C " + repr(line)],
                             input=text, capture_output=True, text=True, check=True, timeout=20)
        return [ln.split("\t")[0] for ln in out.stdout.splitlines()]

    assert comp("agentpen --lea") == ["--learn"]
    assert sorted(comp("agentpen --profile ")) == ["paranoid", "untrusted"]
    assert sorted(comp("agentpen completion ")) == ["bash", "fish", "zsh"]
    assert "--learn" not in comp("agentpen --allow x.example sh --lea")


def test_completion_usage():
    with pytest.raises(UsageError):
        completion.completion_main(["tcsh"])


def test_man_page_lists_every_option_and_renders():
    import datetime

    text = manpage.manpage(datetime.date(2026, 1, 2))
    assert text.startswith('.TH AGENTPEN 1 "2026-01-02"')
    for flag in _all_long_flags():
        assert "\\fB" + flag.replace("-", "\\-") + "\\fR" in text, flag
    for section in ("NAME", "SYNOPSIS", "OPTIONS", "EXIT STATUS", "FILES", "EXAMPLES"):
        assert f".SH {section}" in text
    assert not any(ln.startswith(("'", ". ")) for ln in text.splitlines())
    man = shutil.which("man")
    if man:
        out = subprocess.run([man, "--warnings", "-l", "-"], input=text, capture_output=True,
                             text=True, timeout=30, env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0 and not out.stderr.strip(), out.stderr
        assert "--learn" in out.stdout and "config.toml" in out.stdout


def test_cli_subcommands(capsys, monkeypatch, tmp_path):
    from agentpen.supervisor.cli import main

    assert main(["completion", "bash"]) == 0 and "complete -F _agentpen agentpen" in capsys.readouterr().out
    assert main(["man"]) == 0 and capsys.readouterr().out.startswith(".TH AGENTPEN 1")
    assert main(["completion"]) == 125 and "usage: agentpen completion" in capsys.readouterr().err
    cfg = tmp_path / "agentpen"
    cfg.mkdir()
    (cfg / "config.toml").write_text("[defaults]\nallow = 3\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert main(["config", "show"]) == 125
    err = capsys.readouterr().err
    assert "config.toml:2: key defaults.allow: must be a list" in err
    (cfg / "config.toml").write_text("[defaults]\nallow = []\n")
    assert main(["--profile", "nope", "--", "true"]) == 125
    assert "unknown profile" in capsys.readouterr().err
