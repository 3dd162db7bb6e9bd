"""agentpen's own stderr messages through structlog (supervisor/audit/console.py)."""

from __future__ import annotations

import io
import json

import pytest
from agentpen.supervisor.audit import setup_console


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_are_ecs_shaped_and_filtered_by_level():
    out = io.StringIO()
    log = setup_console("json", "warning", stream=out)
    log.info("not shown")
    log.warning("audit sink failed", sink="fd:3", sni='a"\nb')
    (line,) = out.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["message"] == "audit sink failed" and rec["log"] == {"level": "warning"}
    assert rec["@timestamp"].endswith("Z") and rec["ecs"]["version"].startswith("8.")
    assert rec["agentpen"] == {"sink": "fd:3", "sni": 'a"\nb'}


def test_default_is_console_on_a_tty_and_json_otherwise():
    tty, pipe = Tty(), io.StringIO()
    setup_console(None, "info", stream=tty).info("hello", n=1)
    setup_console(None, "info", stream=pipe).info("hello", n=1)
    assert "hello" in tty.getvalue() and not tty.getvalue().startswith("{")
    assert json.loads(pipe.getvalue())["message"] == "hello"


def test_console_escapes_terminal_control_sequences():
    out = Tty()
    log = setup_console("console", "debug", stream=out)
    log.error("blocked \x1b]0;pwned\x07", sni="x\x1b[2J\x9b")
    text = out.getvalue()
    assert "\x07" not in text and "\x9b" not in text and "\x1b]" not in text
    assert "\\x1b]0;pwned\\x07" in text and "\\x1b[2J\\x9b" in text


def test_bad_format_or_level_is_refused():
    with pytest.raises(ValueError):
        setup_console("xml", "info", stream=io.StringIO())
    with pytest.raises(ValueError):
        setup_console("json", "loud", stream=io.StringIO())


def test_default_stream_is_stderr(capfd):
    setup_console("json", "info").info("to stderr")
    err = capfd.readouterr().err
    assert json.loads(err)["message"] == "to stderr"
