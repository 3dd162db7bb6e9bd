"""AuditStream: stamping, sequence, schema, durability and failure policy (supervisor/audit)."""

from __future__ import annotations

import errno
import json
import re

import jsonschema
import pytest
from agentpen.core.events import make_event
from agentpen.supervisor.audit import AuditHalt, AuditStream, build_record, render
from agentpen.supervisor.audit.ecs import PIPELINE, SCHEMA_VERSION

try:  # tests/unit as a package, or as a plain directory on sys.path
    from .test_audit_support import FakeSink, example_events, load_schema
except ImportError:
    from test_audit_support import FakeSink, example_events, load_schema

VALIDATOR = jsonschema.Draft202012Validator(load_schema())


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def stream_with(*sinks: FakeSink, **kw) -> tuple[AuditStream, Clock]:
    clock = Clock()
    return AuditStream("sess-1", list(sinks), monotonic=clock, **kw), clock


def info(n: int = 0) -> dict:
    return make_event("pasta-message", f"message {n}", category=["process"], type=["info"])


# -- stamping ----------------------------------------------------------------------------


def test_every_line_is_stamped_and_valid_against_the_schema():
    sink = FakeSink()
    stream, _ = stream_with(sink)
    for action, body in example_events().items():
        pid = 4242 if action.startswith("connection") else None
        stream.emit(body, sender="proxy" if pid else "supervisor", pid=pid)
    ids = set()
    for seq, rec in enumerate(sink.records(), 1):
        VALIDATOR.validate(rec)
        assert rec["event"]["sequence"] == seq
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", rec["@timestamp"])
        assert rec["labels"] == {"session_id": "sess-1"}
        assert rec["agentpen"]["schema_version"] == SCHEMA_VERSION == "1.0"
        assert rec["ecs"]["version"].startswith("8.")
        assert "rejected" not in rec["agentpen"], rec["agentpen"].get("rejected")
        ids.add(rec["event"]["id"])
    assert len(ids) == len(sink.lines)
    denied = next(r for r in sink.records() if r["event"]["action"] == "connection-denied")
    assert denied["event"]["type"] == ["connection", "denied"]
    assert denied["event"]["outcome"] == "success"
    assert denied["process"] == {"pid": 4242} and denied["agentpen"]["worker_pid"] == 4242
    assert denied["log"]["level"] == "warning"


def test_the_schema_rejects_what_ecs_forbids():
    rec = build_record(example_events()["connection-denied"], session_id="s", sequence=1,
                       sender="proxy", pid=1)
    VALIDATOR.validate(rec)
    for mutate in (
        lambda r: r["event"].update(outcome="failure"),  # a block is a success
        lambda r: r["event"].update(type=["connection", "blocked"]),  # not an ECS type
        lambda r: r["event"].pop("sequence"),
        lambda r: r.update(extra={}),  # unknown top-level field set
        lambda r: r["destination"].update(port="443"),
        lambda r: r["agentpen"].update(schema_version="2.0"),
    ):
        bad = json.loads(json.dumps(rec))
        mutate(bad)
        assert not VALIDATOR.is_valid(bad)
    closed = build_record(example_events()["connection-closed"], session_id="s", sequence=2,
                          sender="proxy", pid=1)
    closed["event"].pop("duration")
    assert not VALIDATOR.is_valid(closed)


def test_a_body_cannot_override_stamped_fields():
    body = make_event("connection-allowed", "x", category=["network"],
                      type=["connection", "allowed"], outcome="success",
                      destination={"port": 443},
                      event={"sequence": 999, "id": "forged", "ingested": "never"},
                      agentpen={"schema_version": "9.9", "worker": "supervisor", "worker_pid": 1,
                                "chain": {"prev": "0" * 64}, "rejected": {}})
    body["@timestamp"] = "1970-01-01T00:00:00.000000Z"
    body["labels"] = {"session_id": "other-session"}
    body["ecs"] = {"version": "0"}
    body["log"] = {"level": "critical"}
    sink = FakeSink()
    stream, _ = stream_with(sink, chain=True)
    assert stream.emit(body, sender="proxy", pid=77) == 1
    rec = sink.records()[0]
    VALIDATOR.validate(rec)
    assert rec["event"]["sequence"] == 1 and rec["event"]["id"] != "forged"
    assert rec["@timestamp"] != body["@timestamp"]
    assert rec["labels"] == {"session_id": "sess-1"}
    assert rec["ecs"]["version"] != "0" and rec["log"] == {"level": "info"}
    ap = rec["agentpen"]
    assert ap["worker"] == "proxy" and ap["worker_pid"] == 77 and ap["schema_version"] == "1.0"
    assert ap["chain"]["prev"] != "0" * 64
    # Nothing silently lost: every refused value is kept under agentpen.rejected.
    assert ap["rejected"] == {
        "event.sequence": 999, "event.id": "forged", "event.ingested": "never",
        "agentpen.schema_version": "9.9", "agentpen.worker": "supervisor",
        "agentpen.worker_pid": 1, "agentpen.chain": {"prev": "0" * 64}, "agentpen.rejected": {},
        "@timestamp": "1970-01-01T00:00:00.000000Z",
        "labels": {"session_id": "other-session"}, "ecs": {"version": "0"},
        "log": {"level": "critical"},
    }
    assert body["event"]["sequence"] == 999  # the caller's dict is left alone


def test_hostile_values_stay_json_values_and_wrong_types_are_kept_aside():
    sni = 'evil"}\n{"event":{"action":"session-ended"}}\x1b[2J\ud800'
    body = make_event("connection-denied", f"blocked {sni}", category=["network", "nope"],
                      type=["connection", "denied"], outcome="success", reason=sni,
                      destination={"domain": sni, "port": 70000, "bytes": -1},
                      tls={"client": {"server_name": sni}}, event={"duration": "1s"})
    body["event"]["kind"] = "evil"
    body["process"] = "not an object"
    body["agentpen"] = {"nan": float("nan")}
    sink = FakeSink()
    stream, _ = stream_with(sink)
    stream.emit(body, sender="proxy", pid=5)
    assert len(sink.lines) == 1  # one line, whatever the strings hold
    rec = json.loads(sink.lines[0])
    VALIDATOR.validate(rec)
    assert rec["tls"]["client"]["server_name"] == sni
    rej = rec["agentpen"]["rejected"]
    assert rej["destination.port"] == 70000 and rej["destination.bytes"] == -1
    assert rej["event.category"] == ["network", "nope"] and rej["event.kind"] == "evil"
    assert rej["event.duration"] == "1s" and rej["process"] == "not an object"
    assert rec["agentpen"]["nan"] == "nan" and rec["event"]["kind"] == "event"


def test_a_non_object_body_and_missing_fields_still_make_a_valid_line():
    sink = FakeSink()
    stream, _ = stream_with(sink)
    stream.emit(["not", "a", "dict"], sender="proxy", pid=5)  # type: ignore[arg-type]
    stream.emit({"message": 3, "level": "loud"}, sender="proxy", pid=5)
    for rec in sink.records():
        VALIDATOR.validate(rec)
        assert rec["event"]["action"] == "invalid-event"
    assert sink.records()[1]["agentpen"]["rejected"] == {"message": 3, "level": "loud"}


def test_processors_compose_in_structlog():
    structlog = pytest.importorskip("structlog")
    out: list[str] = []

    class Collect:
        def msg(self, text: str) -> None:
            out.append(text)

        info = msg

    def to_json(_l, _n, ed):
        return render(ed).decode()

    def add_stamp(_l, _n, ed):
        ed = dict(ed)
        ed["_stamp"] = ("s", 7, "supervisor", None, 0)
        ed["action"] = ed.pop("event")  # structlog's positional argument is "event"
        return ed

    log = structlog.wrap_logger(Collect(), processors=[add_stamp, *PIPELINE, to_json])
    log.msg("setup-step", message="hello")
    rec = json.loads(out[0])
    VALIDATOR.validate(rec)
    assert rec["event"]["action"] == "setup-step" and rec["event"]["sequence"] == 7
    assert rec["@timestamp"] == "1970-01-01T00:00:00.000000Z"


# -- durability --------------------------------------------------------------------------


def test_fsync_at_once_for_durable_events_else_within_a_second():
    sink = FakeSink()
    stream, clock = stream_with(sink)
    ev = example_events()
    stream.emit(ev["session-started"], sender="supervisor", pid=None)
    assert sink.syncs == 1 and stream.next_deadline() is None
    stream.emit(ev["connection-allowed"], sender="proxy", pid=9)
    stream.emit(ev["setup-step"], sender="netns", pid=8)
    assert sink.syncs == 1
    assert stream.next_deadline() == clock.t + 1.0
    stream.tick(clock.t + 0.5)
    assert sink.syncs == 1
    stream.tick(clock.t + 1.0)
    assert sink.syncs == 2 and sink.synced_upto == 3 and stream.next_deadline() is None
    for action in ("connection-denied", "worker-exited", "worker-restarted", "dns-refused",
                   "session-ended"):
        before = sink.syncs
        stream.emit(ev[action], sender="supervisor", pid=None)
        assert sink.syncs == before + 1, action
    before = sink.syncs
    stream.emit(make_event("x-failed", "boom", level="error"), sender="supervisor", pid=None)
    stream.emit(info(), sender="supervisor", pid=None, durable=True)
    assert sink.syncs == before + 2
    stream.emit(ev["session-started"], sender="supervisor", pid=None, durable=False)
    assert sink.syncs == before + 2
    stream.close()
    assert sink.syncs == before + 3 and sink.closed


def test_a_sink_without_fsync_is_never_synced():
    sink = FakeSink(needs_sync=False)
    stream, _clock = stream_with(sink)
    stream.emit(example_events()["session-started"], sender="supervisor", pid=None)
    stream.emit(info(), sender="supervisor", pid=None)
    assert sink.syncs == 0 and stream.next_deadline() is None


# -- failure policy ------------------------------------------------------------------------


def test_deny_counts_losses_and_records_an_audit_gap_on_recovery():
    states = []
    sink = FakeSink()
    stream = AuditStream("sess-1", [sink], on_state=states.append)
    stream.emit(info(1), sender="supervisor", pid=None)
    sink.fail_write = errno.ENOSPC
    for n in range(2, 5):
        assert stream.emit(info(n), sender="supervisor", pid=None) == n  # never raises
    assert not stream.healthy and stream.failing
    assert states[-1].failing and not states[-1].healthy and "ENOSPC" in states[-1].error
    assert stream.counters["dropped"] == 3
    assert stream.next_deadline() is not None  # tick() will retry
    sink.fail_write = None
    stream.emit(info(5), sender="supervisor", pid=None)
    assert stream.healthy and not states[-1].failing
    recs = sink.records()
    assert [r["event"]["sequence"] for r in recs] == [1, 5, 6]
    gap = recs[1]
    VALIDATOR.validate(gap)
    assert gap["event"]["action"] == "audit-gap" and gap["log"]["level"] == "error"
    assert gap["agentpen"]["gap"]["first"] == 2 and gap["agentpen"]["gap"]["last"] == 4
    assert gap["agentpen"]["gap"]["lost"] == 3
    assert recs[2]["message"] == "message 5"
    assert sink.syncs >= 1  # the gap record itself is durable
    c = stream.counters
    assert c["events"] == 6 and c["dropped"] == 3 and c["gaps"] == 1 and c["sink_failures"] >= 1


def test_recovery_by_tick_alone_and_failed_retries_spend_no_sequence_number():
    sink = FakeSink()
    stream, clock = stream_with(sink)
    stream.emit(info(1), sender="supervisor", pid=None)
    sink.fail_write = errno.EPIPE
    stream.emit(info(2), sender="supervisor", pid=None)
    for _ in range(3):  # failed retries: nothing written, no number spent
        clock.t += 1.0
        stream.tick(clock.t)
    assert stream.sequence == 2 and not stream.healthy
    sink.fail_write = None
    clock.t += 1.0
    stream.tick(clock.t)
    assert stream.healthy and stream.sequence == 3
    assert [r["event"]["sequence"] for r in sink.records()] == [1, 3]


def test_fsync_failure_marks_the_unsynced_lines_uncertain():
    sink = FakeSink()
    stream, clock = stream_with(sink)
    stream.emit(info(1), sender="supervisor", pid=None)
    stream.emit(info(2), sender="supervisor", pid=None)
    sink.fail_sync = errno.EIO
    stream.tick(clock.t + 1.0)
    assert not stream.healthy
    sink.fail_sync = None
    stream.emit(info(3), sender="supervisor", pid=None)
    gap = sink.records()[2]
    assert gap["event"]["action"] == "audit-gap"
    assert gap["agentpen"]["gap"]["unsynced_first"] == 1
    assert gap["agentpen"]["gap"]["unsynced_last"] == 2
    assert gap["agentpen"]["gap"]["lost"] == 0 and "EIO" in gap["agentpen"]["gap"]["error"]


def test_halt_raises_once_and_keeps_counting():
    sink = FakeSink()
    stream, _ = stream_with(sink, failure="halt")
    stream.emit(info(1), sender="supervisor", pid=None)
    sink.fail_write = errno.EIO
    with pytest.raises(AuditHalt, match="EIO"):
        stream.emit(info(2), sender="supervisor", pid=None)
    assert not stream.healthy
    # Teardown's own events (session-ended) must not raise again.
    stream.emit(example_events()["session-ended"], sender="supervisor", pid=None)
    assert stream.counters["dropped"] == 2
    sink.fail_write = None
    stream.emit(info(4), sender="supervisor", pid=None)
    assert not stream.healthy  # a halted stream stays halted
    assert [r["event"]["action"] for r in sink.records()] == ["pasta-message", "audit-gap",
                                                              "pasta-message"]


def test_continue_stays_healthy_but_reports_and_counts():
    states = []
    sink = FakeSink()
    stream = AuditStream("s", [sink], failure="continue", on_state=states.append)
    sink.fail_write = errno.ENOSPC
    stream.emit(info(1), sender="supervisor", pid=None)
    assert stream.healthy and stream.failing and states[-1].failing
    assert stream.counters["dropped"] == 1
    sink.fail_write = None
    stream.emit(info(2), sender="supervisor", pid=None)
    assert [r["event"]["action"] for r in sink.records()] == ["audit-gap", "pasta-message"]


def test_two_sinks_one_failing_keeps_every_sequence_on_the_healthy_one():
    good, bad = FakeSink("good"), FakeSink("bad")
    stream, _ = stream_with(good, bad, chain=True)
    stream.emit(info(1), sender="supervisor", pid=None)
    bad.fail_write = errno.EPIPE
    stream.emit(info(2), sender="supervisor", pid=None)
    assert not stream.healthy
    bad.fail_write = None
    stream.emit(info(3), sender="supervisor", pid=None)
    assert [r["event"]["sequence"] for r in good.records()] == [1, 2, 3, 4]
    assert [r["event"]["sequence"] for r in bad.records()] == [1, 3, 4]
    assert good.records()[2]["agentpen"]["gap"]["sink"] == "bad"
    from agentpen.supervisor.audit import verify_lines

    for sink in (good, bad):
        res = verify_lines(sink.lines, partial=True)
        assert res.ok and res.chained, res
    assert stream.counters["sinks"]["bad"]["lines"] == 3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        AuditStream("s", [FakeSink()], failure="ignore")
    with pytest.raises(ValueError):
        AuditStream("s", [])
    stream = AuditStream("s", [FakeSink()])
    stream.close()
    with pytest.raises(RuntimeError):
        stream.emit(info(), sender="supervisor", pid=None)


def test_importing_the_package_does_not_import_structlog():
    import subprocess
    import sys

    code = ("import sys, agentpen.supervisor.audit as a; "
            "assert 'structlog' not in sys.modules and 'hashlib' not in sys.modules, 'heavy'; "
            "a.AuditStream('s', [a.FileSink('/dev/null')]).emit({'action':'x'}, sender='s', pid=1)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_a_denial_with_another_outcome_is_kept_aside_so_the_line_stays_valid():
    body = make_event("dns-refused", "refused", category=["network"], type=["denied"],
                      outcome="failure", dns={"question": {"name": "x.example"}})
    rec = build_record(body, session_id="s", sequence=1, sender="netns", pid=3)
    VALIDATOR.validate(rec)
    assert "outcome" not in rec["event"]
    assert rec["agentpen"]["rejected"] == {"event.outcome": "failure"}
