"""The guardian's pipe protocol (supervisor/guardian.py): pure parsing of its orders."""

from __future__ import annotations

import json
import struct

from agentpen.supervisor.guardian import _Orders


def _covers_msg(covers: list[list[str]], root: str | None) -> bytes:
    body = json.dumps({"covers": covers, "scratch_root": root}).encode()
    return b"C" + struct.pack("<I", len(body)) + body


def test_pid_then_covers_in_any_chunking():
    stream = (b"P" + struct.pack("<q", 4242)
              + _covers_msg([["/p/.envrc", "file", ".envrc", ""],
                             ["/p/.claude", "scratch", ".claude/", "/tmp/s/.claude"]], "/tmp/s"))
    for size in (1, 2, 3, 7, len(stream)):
        o = _Orders()
        for i in range(0, len(stream), size):
            o.feed(stream[i : i + size])
        assert o.pgid == 4242 and o.scratch_root == "/tmp/s" and not o.released
        assert [(c.path, c.kind, c.source) for c in o.covers] == [
            ("/p/.envrc", "file", ""), ("/p/.claude", "scratch", "/tmp/s/.claude")]


def test_release_wins_and_garbage_is_ignored():
    o = _Orders()
    o.feed(b"P" + struct.pack("<q", 7))
    o.feed(b"zzz")  # not a message: dropped, nothing acted on
    assert o.pgid == 7 and not o.released
    o.feed(b"R")
    assert o.released


def test_nothing_known_until_a_message_is_complete():
    o = _Orders()
    o.feed(b"P\x01\x00")
    assert o.pgid is None
    o = _Orders()
    o.feed(_covers_msg([["/p/x", "dir", "x/", ""]], "/tmp/s")[:-1])
    assert o.covers == [] and o.scratch_root is None
