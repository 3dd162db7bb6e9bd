"""Issue 9: the paranoid profile's pure parts (supervisor/paranoid.py): sizes and
durations, caps, the diff stat and applying it without following symlinks."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
from agentpen.supervisor import paranoid
from agentpen.supervisor.errors import UsageError
from agentpen.supervisor.learn import summary
from agentpen.workers.jail.launch import set_rlimits


@pytest.mark.parametrize("text, want", [("512M", 512 << 20), ("4G", 4 << 30), ("1T", 1 << 40),
                                        ("2GiB", 2 << 30), ("67108864", 64 << 20)])
def test_sizes(text, want):
    assert paranoid.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "4X", "-1G", "1M", "lots"])
def test_bad_sizes(text):
    with pytest.raises(UsageError):
        paranoid.parse_size(text)


def test_durations():
    assert [paranoid.parse_duration(t, "x") for t in ("90", "90s", "30m", "4h", "1d")] == \
        [90, 90, 1800, 14400, 86400]
    for bad in ("0", "1w", "m", "-5m"):
        with pytest.raises(UsageError):
            paranoid.parse_duration(bad, "--wall-time")


def _opts(**kw):
    base = {"profile": "untrusted", "memory": None, "max_procs": None, "cpu_time": None,
            "wall_time": None, "apply": False, "discard": False}
    return types.SimpleNamespace(**{**base, **kw})


def test_limits_defaults_only_for_paranoid_and_flags_win():
    assert paranoid.limits_from(_opts()).rlimits() == {}
    lim = paranoid.limits_from(_opts(profile="paranoid", max_procs=64))
    assert lim.rlimits() == {"data": 8 << 30, "nproc": 64, "cpu": 7200} and lim.wall_time == 4 * 3600
    assert paranoid.limits_from(_opts(wall_time="5m")).wall_time == 300


def test_set_rlimits_refuses_unknown_and_never_raises_above_the_hosts_hard_limit():
    with pytest.raises(ValueError):
        set_rlimits({"stack": 1})
    import resource

    pid = os.fork()
    if pid == 0:  # in a child: the caps are for good
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (10_000, 10_000))
            set_rlimits({"nproc": 50_000, "cpu": 100})
            ok = resource.getrlimit(resource.RLIMIT_NPROC) == (10_000, 10_000) and \
                resource.getrlimit(resource.RLIMIT_CPU) == (100, 101)
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)


def test_diff_and_apply(tmp_path):
    real, copy = tmp_path / "real", tmp_path / "copy"
    _tree(real, {"a.txt": "a", "keep.txt": "k", "gone/x": "x", "gone/y": "y", ".envrc": "",
                 "mode.sh": "#!/bin/sh\n"})
    _tree(copy, {"a.txt": "A", "keep.txt": "k", "new/n.txt": "n", ".envrc": "", "mode.sh": "#!/bin/sh\n"})
    os.chmod(copy / "mode.sh", 0o755)  # noqa: S103 - the test needs an executable
    os.symlink("/etc/passwd", copy / "link")
    (copy / ".git").mkdir()  # placeholder bwrap made for a protected path
    ch = paranoid.diff(str(real), str(copy), protected=[".git", ".envrc"])
    assert ch.added == ["link", "new", "new/n.txt"]
    assert ch.changed == ["a.txt", "mode.sh"]
    assert ch.deleted == ["gone"]  # the directory, not each file in it
    assert "3 added, 2 changed, 1 deleted" in ch.stat()
    assert paranoid.apply(str(real), str(copy), ch) == []
    assert paranoid.diff(str(real), str(copy), protected=[".git", ".envrc"]).stat().endswith(
        "0 added, 0 changed, 0 deleted")
    assert os.readlink(real / "link") == "/etc/passwd"  # a symlink stays a symlink
    assert os.stat(real / "mode.sh").st_mode & 0o777 == 0o755
    assert not (real / ".git").exists()


def test_apply_never_writes_through_a_symlink_in_the_real_project(tmp_path):
    real, copy, outside = tmp_path / "real", tmp_path / "copy", tmp_path / "outside"
    outside.mkdir()
    _tree(copy, {"d/evil": "x", "fine": "f"})
    real.mkdir()
    os.symlink(outside, real / "d")  # planted in the real project meanwhile
    ch = paranoid.Changes(added=["d/evil", "fine"])
    failed = paranoid.apply(str(real), str(copy), ch)
    assert failed and "d/evil" in failed[0]
    assert not (outside / "evil").exists()
    assert (real / "fine").read_text() == "f"  # positive control


def test_apply_strips_setuid(tmp_path):
    real, copy = tmp_path / "real", tmp_path / "copy"
    real.mkdir()
    _tree(copy, {"s": "x"})
    os.chmod(copy / "s", 0o4755)  # noqa: S103 - the test needs a setuid bit
    paranoid.apply(str(real), str(copy), paranoid.Changes(added=["s"]))
    assert os.stat(real / "s").st_mode & 0o7777 == 0o755


def test_decision():
    assert paranoid.decide(_opts(apply=True), tty=False) == "apply"
    assert paranoid.decide(_opts(discard=True), tty=True) == "discard"
    assert paranoid.decide(_opts(), tty=True) == "ask"
    assert paranoid.decide(_opts(), tty=False) == "keep"


def test_learn_summary():
    text = summary({"b.example": 2, "a.example": 1}, "claude", "/c/config.toml")
    assert "--allow a.example --allow b.example" in text
    assert '[agents.claude]\n  add_hosts = ["a.example", "b.example"]' in text
    assert 'allow = ["x.example"]' in summary({"x.example": 1}, None, None)
    assert "would have let everything through" in summary({}, None, None)


@pytest.mark.parametrize("rel, refused", [
    (".git/objects/ab/cdef", False), (".git/refs/heads/main", False), (".git/HEAD", False),
    (".git/index", False), (".git/logs/HEAD", False), (".git/packed-refs", False),
    (".git/commondir", True), (".git/config", True), (".git/hooks/pre-commit", True),
    (".git/worktrees/x/gitdir", True), (".git/modules/m/config", True), (".git/info/attributes", True),
    (".git/objects/info/alternates", True), ("sub/.git/config", True), ("sub/.git/HEAD", False),
    ("src/main.py", False), ("evilgit/config", False),
])
def test_git_refusal(tmp_path, rel, refused):
    assert (paranoid.git_refusal(rel, str(tmp_path)) is not None) is refused


def test_a_gitfile_is_refused(tmp_path):
    (tmp_path / ".git").write_text("gitdir: /elsewhere\n")
    assert "redirects" in paranoid.git_refusal(".git", str(tmp_path))
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    assert paranoid.git_refusal("repo/.git", str(tmp_path)) is None


def test_apply_refuses_git_configuration_but_applies_commits(tmp_path):
    real, copy = tmp_path / "real", tmp_path / "copy"
    _tree(real, {".git/HEAD": "ref: refs/heads/main\n"})
    _tree(copy, {".git/HEAD": "ref: refs/heads/main\n", ".git/commondir": "../evilgit\n",
                 ".git/refs/heads/main": "abc\n", ".git/objects/ab/cd": "obj", "evilgit/config": "[core]\n"})
    ch = paranoid.diff(str(real), str(copy))
    failed = paranoid.apply(str(real), str(copy), ch)
    assert [f.split(":")[0] for f in failed] == [".git/commondir"]
    assert not (real / ".git" / "commondir").exists()
    assert (real / ".git" / "refs" / "heads" / "main").read_text() == "abc\n"  # control
    assert (real / ".git" / "objects" / "ab" / "cd").exists()


def test_user_edits_during_the_session_are_neither_reverted_nor_overwritten(tmp_path):
    real, base = tmp_path / "real", tmp_path / "state"
    _tree(real, {"user.txt": "v1", "agent.txt": "v1", "both.txt": "v1"})
    from agentpen.core.policy import SessionPolicy

    pol = SessionPolicy(session_id="s", profile="paranoid", agent=None, project=str(real),
                        command=["/bin/true"], command_name="true", allow=[], home=str(tmp_path / "h"))
    pol2, sdir, start = paranoid.prepare(pol, str(base))
    assert oct(os.stat(sdir).st_mode & 0o777) == "0o700" and pol2.project == str(real)
    copy = Path(pol2.project_source)
    assert (copy / "user.txt").read_text() == "v1"
    # the session (inside) and the user (outside) work at the same time
    (copy / "agent.txt").write_text("agent v2")
    (copy / "both.txt").write_text("agent v2")
    (copy / "new.txt").write_text("agent new")
    (real / "user.txt").write_text("user v2!")
    (real / "both.txt").write_text("user v2!")
    ch = paranoid.diff(str(real), str(copy), start=start.copy)
    assert ch.changed == ["agent.txt", "both.txt"] and ch.added == ["new.txt"]  # not user.txt
    failed = paranoid.apply(str(real), str(copy), ch, start=start.real)
    assert [f.split(":")[0] for f in failed] == ["both.txt"] and "during the session" in failed[0]
    assert (real / "user.txt").read_text() == "user v2!"  # not reverted
    assert (real / "both.txt").read_text() == "user v2!"  # not overwritten: a conflict
    assert (real / "agent.txt").read_text() == "agent v2" and (real / "new.txt").exists()
    paranoid.remove_session_dir(sdir)
    assert not os.path.exists(sdir)
