"""The session's audit stream: stamps, renders and writes every event to every sink,
with the durability and failure policy of docs/audit.md.

Single-threaded by design (the supervisor's selectors loop calls emit/tick), so the
sequence counter needs no lock, and a record that could not be written anywhere can
give its sequence number back (see _recover).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agentpen.core.record import record

from .ecs import build_record, is_durable, render
from .sinks import Sink

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any, Literal

    FailurePolicy = Literal["halt", "deny", "continue"]

FAILURE_POLICIES = ("halt", "deny", "continue")
SYNC_DELAY_S = 1.0  # the longest a written line waits for its fsync
RETRY_DELAY_S = 1.0  # tick() retries a failed sink this often (emit() retries at once)
GENESIS_PREFIX = "agentpen-audit-genesis:"


def genesis_hash(session_id: str) -> str:
    """``agentpen.chain.prev`` of a session's first line."""
    import hashlib

    return hashlib.sha256((GENESIS_PREFIX + session_id).encode()).hexdigest()


class AuditHalt(Exception):
    """--audit-failure halt: a sink failed; the supervisor must end the session (125)."""


@record(frozen=True)
class AuditState:
    """Told to ``on_state`` when a sink fails or recovers."""

    sink: str
    failing: bool
    error: str | None
    lost: int  # events this sink lost so far in the current outage
    healthy: bool  # the stream's verdict under its policy (see AuditStream.healthy)


class _SinkState:
    def __init__(self, sink: Sink, prev: str) -> None:
        self.sink = sink
        self.prev = prev  # SHA-256 of the last line written here (chain)
        self.failed = False
        self.error: str | None = None
        self.lost_first = 0
        self.lost_last = 0
        self.lost = 0
        self.unsynced_first = 0  # first sequence written since the last good fsync
        self.last_written = 0
        self.uncertain: tuple[int, int] | None = None  # written, then fsync failed
        self.sync_deadline: float | None = None
        self.next_retry = 0.0
        self.lines = 0


class AuditStream:
    """``emit`` one event -> one line in each sink. See docs/audit.md for the contract."""

    def __init__(self, session_id: str, sinks: list[Sink], *, chain: bool = False,
                 failure: str = "deny",
                 on_state: Callable[[AuditState], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if failure not in FAILURE_POLICIES:
            raise ValueError(f"failure must be one of {FAILURE_POLICIES}, not {failure!r}")
        if not sinks:
            raise ValueError("an audit stream needs at least one sink")
        self.session_id = session_id
        self.chain = chain
        self.failure = failure
        self.on_state = on_state
        self._monotonic = monotonic
        genesis = ""
        if chain:  # hashlib (OpenSSL) costs ≈3 ms to import: only when chaining
            import hashlib

            self._sha256 = hashlib.sha256
            genesis = genesis_hash(session_id)
        self._sinks = [_SinkState(s, genesis) for s in sinks]
        self._seq = 0
        self._halted = False
        self._closed = False
        self._dropped = 0  # events missing from at least one sink
        self._failures = 0  # failed write/fsync/reopen operations
        self._gaps = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def failing(self) -> bool:
        """Some sink is not writing right now."""
        return any(s.failed for s in self._sinks)

    @property
    def healthy(self) -> bool:
        """May the session admit new connections? deny/halt: only while every sink
        writes; continue: always (losses are counted and reported)."""
        if self.failure == "continue":
            return True
        return not self._halted and not self.failing

    @property
    def sequence(self) -> int:
        """The last sequence number handed out."""
        return self._seq

    @property
    def counters(self) -> dict[str, Any]:
        return {
            "events": self._seq,
            "dropped": self._dropped,
            "sink_failures": self._failures,
            "gaps": self._gaps,
            "sinks": {s.sink.name: {"lines": s.lines, "lost": s.lost, "failing": s.failed}
                      for s in self._sinks},
        }

    # -- writing -------------------------------------------------------------------------

    def emit(self, body: dict[str, Any], *, sender: str, pid: int | None,
             durable: bool | None = None) -> int:
        """Stamp and write one event; returns its sequence number. Never raises for a
        sink failure except under --audit-failure halt (AuditHalt, once)."""
        if self._closed:
            raise RuntimeError("emit() on a closed audit stream")
        now = self._monotonic()
        newly_failed: list[_SinkState] = []
        for st in self._sinks:
            if st.failed:
                self._recover(st, now, newly_failed)
        self._seq += 1
        record = build_record(body, session_id=self.session_id, sequence=self._seq,
                              sender=sender, pid=pid)
        if durable is None:
            durable = is_durable(record)
        self._write(record, self._sinks, durable, now, newly_failed)
        self._after(newly_failed)
        return self._seq

    def _write(self, record: dict[str, Any], targets: list[_SinkState], durable: bool,
               now: float, newly_failed: list[_SinkState]) -> None:
        seq = record["event"]["sequence"]
        plain: bytes | None = None
        missed = False
        for st in targets:
            if st.failed:
                self._lose(st, seq)
                missed = True
                continue
            if self.chain:
                record["agentpen"]["chain"] = {"prev": st.prev}
                line = render(record)
            else:
                line = plain = plain or render(record)
            try:
                st.sink.write(line, record)
            except OSError as exc:
                self._fail(st, exc, newly_failed)
                self._lose(st, seq)
                missed = True
                continue
            st.lines += 1
            if self.chain:
                st.prev = self._sha256(line[:-1]).hexdigest()
            st.last_written = seq
            if not st.unsynced_first:
                st.unsynced_first = seq
            if st.sink.needs_sync:
                if durable:
                    self._sync(st, newly_failed)
                elif st.sync_deadline is None:
                    st.sync_deadline = now + SYNC_DELAY_S
            else:
                st.unsynced_first = 0
        if missed:
            self._dropped += 1

    def _sync(self, st: _SinkState, newly_failed: list[_SinkState]) -> bool:
        try:
            st.sink.sync()
        except OSError as exc:
            # Lines written since the last good fsync may or may not be on disk.
            st.uncertain = (st.unsynced_first, st.last_written)
            self._fail(st, exc, newly_failed)
            return False
        st.sync_deadline = None
        st.unsynced_first = 0
        return True

    def _lose(self, st: _SinkState, seq: int) -> None:
        if not st.lost_first:
            st.lost_first = seq
        st.lost_last = seq
        st.lost += 1

    def _fail(self, st: _SinkState, exc: OSError, newly_failed: list[_SinkState]) -> None:
        self._failures += 1
        st.error = f"{exc.strerror or exc}" + (f" (errno {exc.errno})" if exc.errno else "")
        st.sync_deadline = None
        if not st.failed:
            st.failed = True
            newly_failed.append(st)

    def _recover(self, st: _SinkState, now: float, newly_failed: list[_SinkState]) -> bool:
        """Try a failed sink again with the audit-gap record that covers its loss. If
        that record cannot be written it is not written anywhere, and its sequence
        number is given back, so what IS written stays gap-free."""
        st.next_retry = now + RETRY_DELAY_S
        try:
            st.sink.reopen()
        except OSError as exc:
            self._failures += 1
            st.error = f"{exc.strerror or exc}"
            return False
        seq = self._seq + 1
        gap: dict[str, Any] = {"sink": st.sink.name, "error": st.error, "lost": st.lost}
        if st.lost:
            gap.update(first=st.lost_first, last=st.lost_last)
        if st.uncertain:
            gap.update(unsynced_first=st.uncertain[0], unsynced_last=st.uncertain[1])
        message = (f"audit sink {st.sink.name} recovered after {st.error}: "
                   + (f"events {st.lost_first}-{st.lost_last} ({st.lost}) lost"
                      if st.lost else "no event lost"))
        body = {"action": "audit-gap", "level": "error", "message": message,
                "event": {"kind": "event", "category": ["host"], "type": ["error"],
                          "outcome": "failure", "reason": st.error or "sink failure"},
                "agentpen": {"gap": gap}}
        record = build_record(body, session_id=self.session_id, sequence=seq,
                              sender="supervisor", pid=None)
        if self.chain:
            record["agentpen"]["chain"] = {"prev": st.prev}
        line = render(record)
        try:
            st.sink.write(line, record)
            if st.sink.needs_sync:
                st.sink.sync()
        except OSError as exc:
            self._failures += 1
            st.error = f"{exc.strerror or exc}" + (f" (errno {exc.errno})" if exc.errno else "")
            return False
        self._seq = seq
        self._gaps += 1
        st.failed, st.error, st.uncertain = False, None, None
        st.lost_first = st.lost_last = st.lost = 0
        st.lines += 1
        if self.chain:
            st.prev = self._sha256(line[:-1]).hexdigest()
        st.last_written, st.unsynced_first, st.sync_deadline = seq, 0, None
        self._notify(st)
        # The other sinks record the gap too: the sequence is the session's, not a sink's.
        self._write(record, [o for o in self._sinks if o is not st], True, now, newly_failed)
        return True

    def _after(self, newly_failed: list[_SinkState]) -> None:
        for st in newly_failed:
            self._notify(st)
        if newly_failed and self.failure == "halt" and not self._halted:
            self._halted = True  # raise once; teardown's own events must not raise again
            st = newly_failed[0]
            raise AuditHalt(f"audit sink {st.sink.name} failed: {st.error}")

    def _notify(self, st: _SinkState) -> None:
        if self.on_state is not None:
            self.on_state(AuditState(st.sink.name, st.failed, st.error, st.lost, self.healthy))

    # -- time ----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When tick() next has work (monotonic), or None."""
        times = [st.sync_deadline for st in self._sinks if st.sync_deadline is not None]
        times += [st.next_retry for st in self._sinks if st.failed]
        return min(times) if times else None

    def tick(self, now: float) -> None:
        """Due fsyncs, retries of failed sinks, rotation checks. `now` is monotonic."""
        if self._closed:
            return
        newly_failed: list[_SinkState] = []
        for st in self._sinks:
            if st.failed:
                if now >= st.next_retry:
                    self._recover(st, now, newly_failed)
                continue
            if st.sync_deadline is not None and now >= st.sync_deadline:
                self._sync(st, newly_failed)
            if not st.failed:
                try:
                    st.sink.check_rotated(now)
                except OSError as exc:
                    self._fail(st, exc, newly_failed)
        self._after(newly_failed)

    def reopen(self) -> None:
        """SIGHUP: reopen every sink (logrotate's copy-less rotation)."""
        newly_failed: list[_SinkState] = []
        for st in self._sinks:
            if st.failed:
                continue  # the next retry reopens it
            try:
                st.sink.reopen()
            except OSError as exc:
                self._fail(st, exc, newly_failed)
        self._after(newly_failed)

    def close(self) -> dict[str, Any]:
        """Sync and close every sink; returns the final counters. Never raises."""
        if self._closed:
            return self.counters
        newly_failed: list[_SinkState] = []
        for st in self._sinks:
            if not st.failed and st.sink.needs_sync and st.unsynced_first:
                self._sync(st, newly_failed)
            try:
                st.sink.close()
            except OSError as exc:
                self._fail(st, exc, newly_failed)
        self._closed = True
        for st in newly_failed:
            self._notify(st)
        return self.counters
