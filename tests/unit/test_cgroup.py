"""Issue 9: the session cgroup (supervisor/cgroup.py) against a fake cgroup v2 tree:
delegated -> created, capped, moved into and out of; anything else -> NotDelegated
with the reason (the caller keeps the rlimits)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agentpen.supervisor.cgroup import NotDelegated, SessionCgroup, own_cgroup


def _tree(tmp_path: Path, *, controllers="cpu memory pids", enabled="", with_v2=True) -> tuple[Path, Path]:
    root = tmp_path / "cg"
    parent = root / "user.slice" / "user-1000.slice" / "user@1000.service" / "app.slice"
    origin = parent / "app-term.scope"
    origin.mkdir(parents=True)
    if with_v2:
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (parent / "cgroup.controllers").write_text(controllers + "\n")
    (parent / "cgroup.subtree_control").write_text(enabled + "\n")
    (parent / "cgroup.procs").write_text("")
    (origin / "cgroup.procs").write_text("")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-term.scope\n")
    return root, proc


def test_delegated_tree_gets_a_capped_sibling_and_we_move_in_and_out(tmp_path):
    root, proc = _tree(tmp_path)
    cg = SessionCgroup.create("s1", memory=512 << 20, pids=64, root=str(root), proc_cgroup=str(proc),
                              uid=os.getuid(), pid=4242)
    path = Path(cg.path)
    assert path.name == "agentpen-s1" and path.parent.name == "app.slice"  # a sibling
    assert (path / "memory.max").read_text() == str(512 << 20)
    assert (path / "pids.max").read_text() == "64"
    assert (path / "cgroup.procs").read_text() == "4242"
    assert (path.parent / "cgroup.subtree_control").read_text() == "+memory +pids"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (path / "pids.events").write_text("max 5\n")
    assert cg.events() == {"oom_kill": 1, "pids_max": 5}
    cg.close(pid=4242)
    assert (Path(cg.origin) / "cgroup.procs").read_text() == "4242"
    assert "memory.max=512M" in cg.describe() and "pids.max=64" in cg.describe()


def test_already_enabled_controllers_are_not_rewritten(tmp_path):
    root, proc = _tree(tmp_path, enabled="memory pids")
    cg = SessionCgroup.create("s2", memory=None, pids=10, root=str(root), proc_cgroup=str(proc),
                              uid=os.getuid(), pid=1)
    assert (Path(cg.path).parent / "cgroup.subtree_control").read_text() == "memory pids\n"
    assert not (Path(cg.path) / "memory.max").exists()


@pytest.mark.parametrize("case, reason", [
    ("v1", "not a cgroup v2 mount"),
    ("other-owner", "not owned by uid"),
    ("no-memory", "lacks the memory controller"),
    ("root-cgroup", "root cgroup"),
])
def test_not_delegated_says_why(tmp_path, case, reason):
    root, proc = _tree(tmp_path, with_v2=case != "v1",
                       controllers="cpu pids" if case == "no-memory" else "cpu memory pids")
    uid = os.getuid() + 1 if case == "other-owner" else os.getuid()
    if case == "root-cgroup":
        proc.write_text("0::/\n")
    with pytest.raises(NotDelegated, match=reason):
        SessionCgroup.create("s3", memory=1 << 30, pids=None, root=str(root), proc_cgroup=str(proc),
                             uid=uid, pid=1)
    assert not list(root.rglob("agentpen-*"))


def test_own_cgroup_parsing():
    assert own_cgroup("12:pids:/x\n0::/user.slice/a.scope\n") == "/user.slice/a.scope"
    with pytest.raises(NotDelegated, match="cgroup v1"):
        own_cgroup("4:memory:/x\n")


def test_this_host_reports_a_reason_rather_than_failing():
    # Whatever this machine is, create() either works or says why: never another error.
    try:
        cg = SessionCgroup.create("probe-test", memory=1 << 30, pids=100, pid=os.getpid())
    except NotDelegated as exc:
        assert str(exc)
    else:
        assert cg.close()
