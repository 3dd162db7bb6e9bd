"""supervisor/persistence.py: what the session planted for the host's git is found by
inode change time and renamed aside; what existed before is left alone."""

import os
import time

from agentpen.supervisor.persistence import SUFFIX, scan, scan_and_quarantine


def _repo(path):
    (path / ".git" / "hooks").mkdir(parents=True)
    (path / ".git" / "config").write_text("[core]\n")
    (path / ".git" / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n")


def test_only_what_changed_since_the_start_is_flagged(tmp_path):
    project = tmp_path / "p"
    _repo(project)
    _repo(project / "old")  # a nested repository that existed before the session
    since = time.time_ns() + 10 * 1_000_000_000  # pretend the session starts later
    assert scan(str(project), since) == ([], True)


def test_planted_commondir_nested_config_hooks_and_gitfile_are_quarantined(tmp_path):
    project = tmp_path / "p"
    _repo(project)
    since = time.time_ns()
    (project / ".git" / "commondir").write_text("../evil\n")
    _repo(project / "sub")
    (project / "sub" / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\ntouch x\n")
    (project / "w").mkdir()
    (project / "w" / ".git").write_text("gitdir: ../elsewhere\n")
    findings, complete = scan_and_quarantine(str(project), since)
    assert complete
    paths = {os.path.relpath(f.path, project) for f in findings}
    assert paths == {".git/commondir", "sub/.git/config", "sub/.git/hooks/post-checkout", "w/.git"}
    for f in findings:
        assert f.quarantined_to == f.path + SUFFIX and os.path.exists(f.quarantined_to)
        assert not os.path.exists(f.path)
    # the top-level repository's own files are the jail's business, never touched here
    assert (project / ".git" / "config").exists()
    assert (project / "sub" / ".git" / "hooks" / "pre-commit.sample").exists()  # samples never run
