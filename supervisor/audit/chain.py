"""`agentpen audit verify FILE...`: check an audit stream's hash chain and sequence.

Each session in a file is checked on its own (several sessions may append to one
--audit-log file, even at the same time): line n of a session carries
``agentpen.chain.prev`` = SHA-256 (hex) of line n-1's bytes without the newline; the
first line carries SHA-256 of ``"agentpen-audit-genesis:" + session_id``. Sequences
must run 1, 2, 3... with no gap except one an ``audit-gap`` record declares.

What a chain cannot show: an edit to a session's very last line that keeps it valid
JSON, or a whole file rewritten by someone who recomputes every hash. Ship the stream
off the host as it is written for that (docs/audit.md).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field

from .stream import genesis_hash

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any


@dataclass
class _Session:
    prev: str | None = None  # hash of this session's previous line
    last_seq: int = 0
    chained: bool | None = None
    ended: bool = False
    lines: int = 0


@dataclass
class VerifyResult:
    ok: bool
    lines: int = 0
    sessions: int = 0
    chained: bool = False  # every line carried a chain hash
    line: int | None = None  # first bad line, 1-based over the files in order
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def _bad(res: VerifyResult, lineno: int, reason: str) -> VerifyResult:
    res.ok, res.line, res.reason = False, lineno, reason
    return res


def verify_lines(lines: list[bytes], *, partial: bool = False) -> VerifyResult:
    """Check raw lines (newline stripped or not). `partial`: a session may start after
    sequence 1 (an earlier file) or lack session-ended (still running, or cut)."""
    res = VerifyResult(ok=True)
    sessions: dict[str, _Session] = {}
    all_chained = True
    for n, raw in enumerate(lines, 1):
        data = raw[:-1] if raw.endswith(b"\n") else raw
        if not data.strip():
            return _bad(res, n, "empty line")
        try:
            rec: Any = json.loads(data)
            sid = rec["labels"]["session_id"]
            seq = rec["event"]["sequence"]
            action = rec["event"]["action"]
        except (ValueError, KeyError, TypeError):
            return _bad(res, n, "not an audit record (invalid JSON or missing stamped fields)")
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(sid, str):
            return _bad(res, n, "event.sequence or labels.session_id has the wrong type")
        sess = sessions.get(sid)
        if sess is None:
            sess = sessions[sid] = _Session()
            if seq != 1 and not partial:
                return _bad(res, n, f"session {sid} starts at sequence {seq}, not 1 "
                                    "(lines removed, or an earlier file is missing)")
        if sess.ended:
            return _bad(res, n, f"session {sid} has a line after session-ended")
        agentpen = rec.get("agentpen") if isinstance(rec.get("agentpen"), dict) else {}
        chain = agentpen.get("chain")
        prev = chain.get("prev") if isinstance(chain, dict) else None
        chained = prev is not None
        if sess.chained is None:
            sess.chained = chained
        elif sess.chained != chained:
            return _bad(res, n, f"session {sid}: chain hash present on some lines only")
        all_chained &= chained
        if chained:
            expect = sess.prev
            if expect is None and seq == 1:
                expect = genesis_hash(sid)
            if expect is not None and prev != expect:
                what = "the session's genesis" if sess.prev is None else "the line before"
                return _bad(res, n, f"chain broken: prev does not match {what} "
                                    "(a line was edited, removed or reordered)")
        if sess.lines:
            allowed = {sess.last_seq + 1}
            if action == "audit-gap":
                allowed.add(seq)  # checked below against what the record declares
            if seq not in allowed:
                return _bad(res, n, f"session {sid}: sequence {seq} after {sess.last_seq} "
                                    "with no audit-gap record")
            if action == "audit-gap" and seq != sess.last_seq + 1:
                gap = agentpen.get("gap") if isinstance(agentpen.get("gap"), dict) else {}
                if (gap.get("first"), gap.get("last")) != (sess.last_seq + 1, seq - 1):
                    return _bad(res, n, f"session {sid}: audit-gap at {seq} does not cover "
                                        f"the missing {sess.last_seq + 1}-{seq - 1}")
        sess.prev = hashlib.sha256(data).hexdigest()
        sess.last_seq = seq
        sess.lines += 1
        sess.ended = action == "session-ended"
        res.lines += 1
    res.sessions = len(sessions)
    res.chained = bool(lines) and all_chained
    for sid, sess in sessions.items():
        if not sess.ended:
            msg = f"session {sid} has no session-ended line (cut short, or still running)"
            if not partial:
                return _bad(res, res.lines, msg)
            res.warnings.append(msg)
    if not res.chained:
        res.warnings.append("no hash chain (--audit-chain was off): only sequences checked")
    return res


def verify_chain(path: str | list[str], *, partial: bool = False) -> VerifyResult:
    """Verify one file, or several (rotated pieces, oldest first) as one stream."""
    paths = [path] if isinstance(path, str) else path
    lines: list[bytes] = []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            # The last line was cut mid-write: nothing after it can be trusted either.
            res = verify_lines(lines + data.split(b"\n")[:-1], partial=True)
            if not res.ok:
                return res
            return _bad(res, len(lines) + data.count(b"\n") + 1,
                        f"{p} ends in the middle of a line")
        lines.extend(data.split(b"\n")[:-1])
    return verify_lines(lines, partial=partial)


def audit_verify_main(argv: list[str]) -> int:
    """``agentpen audit verify [--partial] FILE...``: 0 ok, 1 broken, 2 usage or I/O."""
    import argparse

    p = argparse.ArgumentParser(prog="agentpen audit verify",
                                description="check an audit stream's hash chain and sequence")
    p.add_argument("--partial", action="store_true",
                   help="accept a session that starts after sequence 1 or has not ended")
    p.add_argument("files", nargs="+", metavar="FILE", help="audit files, oldest first")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    try:
        res = verify_chain(args.files, partial=args.partial)
    except OSError as exc:
        print(f"agentpen audit verify: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not res.ok:
        print(f"BROKEN at line {res.line}: {res.reason}")
        return 1
    print(f"ok: {res.lines} lines, {res.sessions} session(s), "
          f"{'hash chain intact' if res.chained else 'sequences intact, not chained'}")
    return 0
