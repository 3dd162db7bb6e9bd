"""The user's git identity (only name and e-mail) reaches the jail through GIT_CONFIG_*."""

import shutil

import pytest
from agentpen.supervisor.resolve import git_identity_env


@pytest.fixture(autouse=True)
def _git():
    if not shutil.which("git"):
        pytest.fail("git is needed")


def test_name_and_email_only(tmp_path):
    (tmp_path / ".gitconfig").write_text(
        "[user]\n\tname = Ada L\n\temail = ada@example.com\n\tsigningkey = SECRET\n"
        "[credential]\n\thelper = store\n")
    env = git_identity_env({"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert env["GIT_CONFIG_COUNT"] == "2"
    got = {env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"] for i in range(2)}
    assert got == {"user.name": "Ada L", "user.email": "ada@example.com"}
    assert "SECRET" not in str(env) and "store" not in str(env)


def test_no_identity_passes_nothing(tmp_path):
    assert git_identity_env({"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}) == {}
