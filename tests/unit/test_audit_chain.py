"""Hash chain and `agentpen audit verify` (supervisor/audit/chain.py)."""

from __future__ import annotations

import json

import pytest
from agentpen.core.events import make_event
from agentpen.supervisor.audit import (
    AuditStream,
    FileSink,
    audit_verify_main,
    genesis_hash,
    verify_chain,
    verify_lines,
)


def write_session(path, session_id: str = "s1", n: int = 6, *, chain: bool = True) -> list[bytes]:
    stream = AuditStream(session_id, [FileSink(str(path))], chain=chain)
    stream.emit(make_event("session-started", "start", type=["start"]), sender="supervisor",
                pid=None)
    for i in range(n - 2):
        stream.emit(make_event("connection-allowed", f"c{i}", type=["connection", "allowed"],
                               destination={"port": 443}), sender="proxy", pid=10)
    stream.emit(make_event("session-ended", "end", type=["end"], event={"duration": 5}),
                sender="supervisor", pid=None)
    stream.close()
    with open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def test_a_written_chain_verifies_and_starts_at_the_documented_genesis(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = write_session(path)
    first = json.loads(lines[0])
    assert first["agentpen"]["chain"]["prev"] == genesis_hash("s1")
    import hashlib

    assert genesis_hash("s1") == hashlib.sha256(b"agentpen-audit-genesis:s1").hexdigest()
    res = verify_chain(str(path))
    assert res.ok and res.chained and res.lines == 6 and res.sessions == 1
    assert audit_verify_main([str(path)]) == 0


@pytest.mark.parametrize("damage", ["edit", "remove", "reorder", "remove-first", "truncate",
                                    "torn", "forge-seq"])
def test_damage_is_detected_with_its_line_number(tmp_path, damage, capsys):
    path = tmp_path / "a.jsonl"
    lines = write_session(path)
    expect_line = {"edit": 4, "remove": 3, "reorder": 3, "remove-first": 1, "truncate": 5,
                   "torn": 6, "forge-seq": 3}[damage]
    if damage == "edit":  # an allowed host changed after the fact, still valid JSON
        lines[2] = lines[2].replace(b'"c1"', b'"cX"')
    elif damage == "remove":
        del lines[2]
    elif damage == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
    elif damage == "remove-first":
        del lines[0]
    elif damage == "truncate":
        del lines[-1]
    elif damage == "torn":
        lines[-1] = lines[-1][:40]
    elif damage == "forge-seq":  # a line removed and the hole hidden by renumbering
        rec = json.loads(lines[3])
        del lines[2]
        rec["event"]["sequence"] = 3
        lines[2] = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    res = verify_chain(str(path))
    assert not res.ok
    assert res.line == expect_line, res
    assert audit_verify_main([str(path)]) == 1
    assert f"BROKEN at line {expect_line}" in capsys.readouterr().out


def test_without_a_chain_sequences_are_still_checked(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = write_session(path, chain=False)
    res = verify_chain(str(path))
    assert res.ok and not res.chained and any("no hash chain" in w for w in res.warnings)
    del lines[2]
    res = verify_lines(lines)
    assert not res.ok and res.line == 3 and "no audit-gap" in (res.reason or "")


def test_interleaved_sessions_in_one_file_each_verify(tmp_path):
    a = write_session(tmp_path / "a.jsonl", "sa")
    b = write_session(tmp_path / "b.jsonl", "sb", n=3)
    mixed = [a[0], b[0], a[1], a[2], b[1], a[3], a[4], b[2], a[5]]
    res = verify_lines(mixed)
    assert res.ok and res.sessions == 2
    mixed[1], mixed[4] = mixed[4], mixed[1]
    assert not verify_lines(mixed).ok


def test_an_open_session_needs_partial(tmp_path):
    lines = write_session(tmp_path / "a.jsonl")[:-1]
    (tmp_path / "open.jsonl").write_bytes(b"".join(lines))
    assert not verify_chain(str(tmp_path / "open.jsonl")).ok
    res = verify_chain(str(tmp_path / "open.jsonl"), partial=True)
    assert res.ok and res.warnings
    assert audit_verify_main(["--partial", str(tmp_path / "open.jsonl")]) == 0


def test_a_declared_gap_passes_and_an_undeclared_one_does_not():
    def rec(seq, action="pasta-message", gap=None):
        r = {"labels": {"session_id": "s"}, "event": {"sequence": seq, "action": action},
             "agentpen": {}}
        if gap:
            r["agentpen"]["gap"] = gap
        return json.dumps(r).encode()

    ok = [rec(1, "session-started"), rec(2), rec(6, "audit-gap", {"first": 3, "last": 5}),
          rec(7, "session-ended")]
    assert verify_lines(ok).ok
    lying = [rec(1, "session-started"), rec(2), rec(6, "audit-gap", {"first": 4, "last": 5}),
             rec(7, "session-ended")]
    assert not verify_lines(lying).ok


def test_cli_usage_and_io_errors(tmp_path, capsys):
    assert audit_verify_main([]) == 2
    assert audit_verify_main([str(tmp_path / "missing")]) == 2
    (tmp_path / "junk").write_bytes(b"hello\n")
    assert audit_verify_main([str(tmp_path / "junk")]) == 1
    assert "not an audit record" in capsys.readouterr().out
