"""Issue 2: agentpen refuses to run as root (pasta refuses root too), with one clear line."""

import os

from agentpen.supervisor import cli


def test_root_is_refused_with_125_and_a_reason(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    status = cli.main(["--", "true"])
    err = capsys.readouterr().err
    assert status == 125
    assert "root" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_positive_control_the_same_call_gets_past_the_root_check(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    from agentpen.supervisor import check

    assert check.check_not_root().ok
