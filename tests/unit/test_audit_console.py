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


def test_holding_keeps_info_lines_until_release_and_never_reorders():
    out = io.StringIO()
    log = setup_console("json", "info", stream=out, hold=True)
    log.info("audit log", sink="/x")
    log.debug("not shown at info")
    assert out.getvalue() == ""  # held: the command has not started yet
    log.warning("something odd")  # printed at once, after what was held
    log.info("after the warning")
    first, second, third = (json.loads(x) for x in out.getvalue().splitlines())
    assert [first["message"], second["message"], third["message"]] == [
        "audit log", "something odd", "after the warning"]
    assert first["agentpen"] == {"sink": "/x"}  # the hold-time stamp does not leak as a field
    assert first["@timestamp"] <= second["@timestamp"]


def test_release_prints_held_lines_with_the_time_they_were_logged(monkeypatch):
    import time as time_mod

    out = io.StringIO()
    log = setup_console("json", "info", stream=out, hold=True)
    monkeypatch.setattr(time_mod, "time", lambda: 1_700_000_000.25)
    log.info("early")
    monkeypatch.setattr(time_mod, "time", lambda: 1_800_000_000.0)
    log.release()
    rec = json.loads(out.getvalue())
    assert rec["@timestamp"] == "2023-11-14T22:13:20.250000Z"
    log.info("direct")  # not held any more
    assert len(out.getvalue().splitlines()) == 2


def test_structlog_is_imported_only_when_a_line_is_printed():
    import subprocess
    import sys

    code = ("import sys, io; from agentpen.supervisor.audit import setup_console; "
            "log = setup_console('json', 'warning', stream=io.StringIO()); log.info('filtered'); "
            "a = 'structlog' in sys.modules; log.warning('printed'); "
            "print(a, 'structlog' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]  # the control: printing does import it


def test_holding_says_whether_a_held_line_will_be_printed():
    """The session preloads structlog only when something held will be printed."""
    quiet = setup_console("json", "warning", stream=io.StringIO(), hold=True)
    quiet.info("filtered out at warning")
    assert not quiet.holding()
    loud = setup_console("json", "info", stream=io.StringIO(), hold=True)
    assert not loud.holding()
    loud.info("held")
    assert loud.holding()  # the positive control
    loud.release()
    assert not loud.holding()
