"""Audit sinks against real files, pipes, ttys, /dev/full, RLIMIT_FSIZE and a fake
journald socket (supervisor/audit/sinks.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from agentpen.core.events import make_event
from agentpen.supervisor.audit import (
    AuditSinkError,
    AuditStream,
    FdSink,
    FileSink,
    JournaldSink,
    default_audit_path,
    open_sinks,
    sink_paths,
    verify_chain,
    verify_lines,
)
from agentpen.supervisor.audit.sinks import journal_field

try:  # tests/unit as a package, or as a plain directory on sys.path
    from .test_audit_support import example_events
except ImportError:
    from test_audit_support import example_events


def info(n: int) -> dict:
    return make_event("pasta-message", f"message {n}", category=["process"], type=["info"])


def lines_of(path) -> list[dict]:
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    return [json.loads(x) for x in data.split(b"\n")[:-1]]


# -- file ------------------------------------------------------------------------------


def test_default_file_is_per_session_0600_under_0700_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    old = os.umask(0o022)
    try:
        sinks = open_sinks(None, None, session_id="abc-123")
    finally:
        os.umask(old)
    (sink,) = sinks
    assert isinstance(sink, FileSink)
    assert sink.path == default_audit_path("abc-123")
    assert sink.path.startswith(str(tmp_path / "state" / "agentpen" / "audit") + "/")
    assert sink.path.endswith("-abc-123.jsonl")
    assert stat.S_IMODE(os.stat(sink.path).st_mode) == 0o600
    for d in ("state", "state/agentpen", "state/agentpen/audit"):
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == 0o700, d
    assert fcntl.fcntl(sink.fd, fcntl.F_GETFL) & os.O_APPEND
    assert not os.get_inheritable(sink.fd)
    assert sink_paths(sinks) == [os.path.realpath(sink.path)]
    sink.close()
    # state_dir is agentpen's own state directory; a relative XDG_STATE_HOME is ignored.
    assert default_audit_path("x", str(tmp_path / "ap")).startswith(str(tmp_path / "ap/audit/"))
    monkeypatch.setenv("XDG_STATE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_audit_path("x").startswith(str(tmp_path / "home/.local/state/agentpen/audit/"))


def test_session_ids_that_are_not_file_names_are_refused(tmp_path):
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(AuditSinkError):
            open_sinks(None, None, session_id=bad, state_dir=str(tmp_path))


def test_existing_file_is_appended_and_tightened_and_a_foreign_one_refused(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"old":1}\n')
    path.chmod(0o644)
    (sink,) = open_sinks(str(path), None, session_id="s")
    stream = AuditStream("s", [sink])
    stream.emit(info(1), sender="supervisor", pid=None)
    stream.close()
    data = path.read_bytes()
    assert data.startswith(b'{"old":1}\n') and data.count(b"\n") == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        with pytest.raises(AuditSinkError, match="belongs to uid 65534"):
            open_sinks(str(path), None, session_id="s")


def test_missing_parents_of_a_chosen_path_are_made_0700(tmp_path):
    path = tmp_path / "a" / "b" / "audit.jsonl"
    (sink,) = open_sinks(str(path), None, session_id="s")
    sink.close()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    with pytest.raises(AuditSinkError):
        open_sinks(str(tmp_path), None, session_id="s")  # a directory


def test_rotation_is_noticed_within_a_second_and_sighup_reopens(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = FileSink(str(path))
    now = [100.0]
    stream = AuditStream("s", [sink], chain=True, monotonic=lambda: now[0])
    stream.emit(info(1), sender="supervisor", pid=None)
    stream.tick(now[0])  # first check: same file
    os.rename(path, tmp_path / "audit.jsonl.1")  # logrotate, no copytruncate
    stream.emit(info(2), sender="supervisor", pid=None)  # still the old file
    stream.tick(now[0] + 0.5)  # checked at most once a second
    assert not path.exists()
    now[0] += 1.0
    stream.tick(now[0])
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    stream.emit(info(3), sender="supervisor", pid=None)
    os.rename(path, tmp_path / "audit.jsonl.2")
    stream.reopen()  # SIGHUP
    stream.emit(make_event("session-ended", "end", category=["session"], type=["end"],
                           event={"duration": 1}), sender="supervisor", pid=None)
    stream.close()
    seqs = [[r["event"]["sequence"] for r in lines_of(tmp_path / name)]
            for name in ("audit.jsonl.1", "audit.jsonl.2", "audit.jsonl")]
    assert seqs == [[1, 2], [3], [4]]
    # The chain runs across the rotated pieces, oldest first.
    pieces = [str(tmp_path / n) for n in ("audit.jsonl.1", "audit.jsonl.2", "audit.jsonl")]
    assert verify_chain(pieces).ok
    assert not verify_chain(pieces[1:]).ok  # starts mid-session
    assert verify_chain(pieces[1:], partial=True).ok


def test_dev_full_gives_enospc_and_deny_mode_records_it(tmp_path):
    sink = FileSink("/dev/full")
    states = []
    stream = AuditStream("s", [sink], on_state=states.append)
    assert stream.emit(info(1), sender="supervisor", pid=None) == 1
    assert not stream.healthy and "errno 28" in states[0].error
    assert stream.counters["dropped"] == 1 and stream.counters["sink_failures"] >= 1
    stream.close()


_FSIZE_CHILD = textwrap.dedent("""
    import json, resource, sys
    from agentpen.core.events import make_event
    from agentpen.supervisor.audit import AuditStream, FileSink
    path, limit = sys.argv[1], int(sys.argv[2])
    stream = AuditStream("s", [FileSink(path)], chain=True)
    ev = lambda n: make_event("pasta-message", "x" * 150 + str(n), type=["info"])
    stream.emit(make_event("session-started", "s", type=["start"]), sender="supervisor", pid=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # a disk that fills up
    for n in range(20):
        stream.emit(ev(n), sender="supervisor", pid=1)
    healthy_when_full = stream.healthy
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    stream.emit(ev(99), sender="supervisor", pid=1)
    stream.emit(make_event("session-ended", "e", type=["end"], event={"duration": 1}),
                sender="supervisor", pid=1)
    print(json.dumps({"full": healthy_when_full, "after": stream.healthy,
                      "counters": stream.close()}))
""")


def test_a_disk_filling_mid_line_leaves_only_whole_lines_and_a_gap_record(tmp_path):
    """RLIMIT_FSIZE makes a real short write (part of a line), then EFBIG, just as a
    filling disk would; the torn tail is removed and the stream still verifies."""
    path = tmp_path / "audit.jsonl"
    out = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(path), "2000"],
                         capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(out.stdout)
    assert report["full"] is False and report["after"] is True
    recs = lines_of(path)  # every line parses: no torn line left behind
    assert os.path.getsize(path) > 2000
    gaps = [r for r in recs if r["event"]["action"] == "audit-gap"]
    assert len(gaps) == 1
    gap = gaps[0]["agentpen"]["gap"]
    assert gap["last"] == 21 and gap["lost"] == gap["last"] - gap["first"] + 1
    assert report["counters"]["dropped"] == gap["lost"]
    assert verify_chain(str(path)).ok


# -- --audit-fd ------------------------------------------------------------------------


def test_audit_fd_refuses_a_terminal_and_the_standard_descriptors(tmp_path):
    master, slave = os.openpty()
    try:
        with pytest.raises(AuditSinkError, match="terminal"):
            open_sinks(str(tmp_path / "a.jsonl"), slave, session_id="s")
    finally:
        os.close(master)
        os.close(slave)
    for fd in (0, 1, 2):
        with pytest.raises(AuditSinkError, match="shares"):
            FdSink(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(AuditSinkError, match="not open for writing"):
            FdSink(r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(AuditSinkError):
        FdSink(987)  # not open


def test_audit_fd_that_duplicates_stdout_is_refused():
    code = textwrap.dedent("""
        import os
        from agentpen.supervisor.audit import FdSink, AuditSinkError
        fd = os.dup(1)
        try:
            FdSink(fd)
        except AuditSinkError as exc:
            print("refused:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         timeout=30, check=True)
    assert "refused:" in out.stdout and "descriptor 1" in out.stdout


def test_audit_fd_pipe_whose_reader_goes_away_is_an_epipe_not_a_death(tmp_path):
    r, w = os.pipe()
    os.set_inheritable(w, True)
    sink = FdSink(w)
    assert not os.get_inheritable(w)  # never leaks into a worker or the sandbox
    file_sink = FileSink(str(tmp_path / "a.jsonl"))
    stream = AuditStream("s", [file_sink, sink])
    stream.emit(info(1), sender="supervisor", pid=None)
    assert json.loads(os.read(r, 65536))["event"]["sequence"] == 1
    os.close(r)  # Vector died
    stream.emit(info(2), sender="supervisor", pid=None)  # alive: Python ignores SIGPIPE
    assert not stream.healthy
    assert stream.counters["sinks"][f"fd:{w}"]["lost"] == 1
    assert [r["event"]["sequence"] for r in lines_of(tmp_path / "a.jsonl")] == [1, 2]
    stream.close()


def test_audit_fd_on_dev_full_and_on_a_regular_file(tmp_path):
    fd = os.open("/dev/full", os.O_WRONLY | os.O_APPEND)
    stream = AuditStream("s", [FdSink(fd)], failure="continue")
    stream.emit(info(1), sender="supervisor", pid=None)
    assert stream.healthy and stream.failing and stream.counters["dropped"] == 1
    stream.close()
    path = tmp_path / "f.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)  # caller forgot O_APPEND
    sink = FdSink(fd)
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND and sink.needs_sync
    stream = AuditStream("s", [sink])
    stream.emit(info(1), sender="supervisor", pid=None)
    stream.close()
    assert lines_of(path)[0]["event"]["sequence"] == 1


# -- journald --------------------------------------------------------------------------


def parse_native(data: bytes) -> dict[str, bytes]:
    """journald's native protocol, as systemd-journald reads it."""
    fields: dict[str, bytes] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        eq = data.find(b"=", i, nl)
        if eq >= 0:
            fields[data[i:eq].decode()] = data[eq + 1:nl]
            i = nl + 1
        else:
            name = data[i:nl].decode()
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            fields[name] = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return fields


def recv_journal(server: socket.socket) -> dict[str, bytes]:
    data, anc, _flags, _ = server.recvmsg(1 << 20, socket.CMSG_SPACE(4))
    if not data:  # the large-message form: a sealed memfd
        ((_lvl, _kind, payload),) = anc
        (fd,) = struct.unpack("i", payload[:4])
        try:
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    return parse_native(data)


@pytest.fixture
def journal(tmp_path):
    path = str(tmp_path / "journal.socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    yield path, server
    server.close()


def test_journald_native_protocol_fields_and_binary_safe_values(journal):
    path, server = journal
    sink = JournaldSink(path)
    stream = AuditStream("sess-9", [sink])
    stream.emit(example_events()["connection-denied"], sender="proxy", pid=12)
    f = recv_journal(server)
    assert f["MESSAGE"] == b"blocked evil.example:443: not in the allowlist"
    assert f["PRIORITY"] == b"4" and f["SYSLOG_IDENTIFIER"] == b"agentpen"
    assert f["AGENTPEN_SESSION_ID"] == b"sess-9"
    assert f["AGENTPEN_ACTION"] == b"connection-denied" and f["AGENTPEN_SEQUENCE"] == b"1"
    assert json.loads(f["AGENTPEN_ECS"])["destination"]["domain"] == "evil.example"
    # An attacker's newline cannot start a forged field: the value travels sized.
    forged = "x\nAGENTPEN_ACTION=session-ended\nPRIORITY=0"
    stream.emit(make_event("connection-denied", forged, type=["connection", "denied"],
                           outcome="success"), sender="proxy", pid=12)
    f = recv_journal(server)
    assert f["MESSAGE"] == forged.encode() and f["AGENTPEN_ACTION"] == b"connection-denied"
    assert f["PRIORITY"] == b"6"
    assert journal_field("A", "x\ny") == b"A\n" + struct.pack("<Q", 3) + b"x\ny\n"
    stream.close()


def test_journald_large_record_goes_in_a_sealed_memfd(journal):
    path, server = journal
    sink = JournaldSink(path)
    assert sink.sock is not None
    sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = AuditStream("s", [sink])
    big = ["a" * 100] * 2000  # ~200 kB of argv
    stream.emit(make_event("session-started", "start", type=["start"],
                           process={"args": big}), sender="supervisor", pid=None)
    f = recv_journal(server)
    assert json.loads(f["AGENTPEN_ECS"])["process"]["args"] == big
    assert stream.healthy
    stream.close()


def test_journald_restart_is_a_gap_then_a_reconnect(journal, tmp_path):
    path, server = journal
    stream = AuditStream("s", [JournaldSink(path)])
    stream.emit(info(1), sender="supervisor", pid=None)
    recv_journal(server)
    server.close()
    os.unlink(path)  # journald stopped
    stream.emit(info(2), sender="supervisor", pid=None)
    assert not stream.healthy
    server2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server2.bind(path)  # journald back, with a new socket
    server2.settimeout(5)
    try:
        stream.emit(info(3), sender="supervisor", pid=None)
        assert stream.healthy
        gap = recv_journal(server2)
        assert gap["AGENTPEN_ACTION"] == b"audit-gap"
        assert json.loads(gap["AGENTPEN_ECS"])["agentpen"]["gap"]["first"] == 2
        assert recv_journal(server2)["AGENTPEN_SEQUENCE"] == b"4"
    finally:
        server2.close()
    stream.close()


def test_journald_missing_socket_refuses_to_start(tmp_path):
    with pytest.raises(AuditSinkError, match="journald"):
        JournaldSink(str(tmp_path / "nope"))
    assert errno.ENOENT  # the error names the socket, the session does not start


_TMPFS_CHILD = textwrap.dedent("""
    import json, os, sys
    from agentpen.core.events import make_event
    from agentpen.supervisor.audit import AuditStream, FileSink
    d = sys.argv[1]
    with open(os.path.join(d, "filler"), "wb") as f:
        f.write(b"f" * 16384)
    path = os.path.join(d, "audit.jsonl")
    stream = AuditStream("t", [FileSink(path)], chain=True)
    stream.emit(make_event("session-started", "s", type=["start"]), sender="supervisor", pid=1)
    n = 0
    while stream.healthy and n < 10000:  # until the disk is full
        n += 1
        stream.emit(make_event("pasta-message", "y" * 300, type=["info"]), sender="netns", pid=2)
    for _ in range(5):  # lost while full
        stream.emit(make_event("pasta-message", "lost", type=["info"]), sender="netns", pid=2)
    os.unlink(os.path.join(d, "filler"))  # space again
    stream.emit(make_event("session-ended", "e", type=["end"], event={"duration": 1}),
                sender="supervisor", pid=1)
    counters = stream.close()
    sys.stderr.write(json.dumps(counters) + "\\n")
    sys.stdout.buffer.write(open(path, "rb").read())
""")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
def test_a_real_full_tmpfs_then_space_again(tmp_path):
    """A 64 KiB tmpfs in a private mount namespace: the stream fills it, is told
    ENOSPC (possibly mid-line), counts the losses, and records the gap once space is
    freed; the result verifies."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" && exec "$2" -c "$3" "$1"'
    out = subprocess.run([*unshare, "sh", "-c", script, "sh", str(mnt), sys.executable,
                          _TMPFS_CHILD], capture_output=True, timeout=60, check=True)
    counters = json.loads(out.stderr.decode().strip().splitlines()[-1])
    path = tmp_path / "audit.jsonl"
    path.write_bytes(out.stdout)
    recs = lines_of(path)
    gaps = [r["agentpen"]["gap"] for r in recs if r["event"]["action"] == "audit-gap"]
    assert len(gaps) == 1 and gaps[0]["lost"] >= 6 and "errno 28" in gaps[0]["error"]
    assert counters["dropped"] == gaps[0]["lost"] and counters["gaps"] == 1
    assert recs[-1]["event"]["action"] == "session-ended"
    assert len(out.stdout) > 40000  # the disk really filled
    assert verify_chain(str(path)).ok


def test_a_stalled_fd_reader_costs_a_bounded_wait_once_then_recovers():
    r, w = os.pipe()
    sink = FdSink(w)
    assert fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK
    sink.stall_timeout = 0.3
    stream = AuditStream("s", [sink])
    durations = []
    while stream.healthy:  # the reader never reads: the pipe fills up
        t0 = time.monotonic()
        stream.emit(info(len(durations)), sender="supervisor", pid=None)
        durations.append(time.monotonic() - t0)
        assert len(durations) < 10000
    assert 0.3 <= durations[-1] < 2.0  # waited, boundedly
    for n in range(3):  # stalled: later events do not wait again
        t0 = time.monotonic()
        stream.emit(info(n), sender="supervisor", pid=None)
        assert time.monotonic() - t0 < 0.2
    lost = stream.counters["dropped"]
    assert lost == 4
    os.set_blocking(r, False)

    def drain() -> bytes:
        out = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 1 << 16):
                out += chunk
        return out

    got = drain()  # the reader wakes up
    stream.emit(info(99), sender="supervisor", pid=None)
    assert stream.healthy
    tail = drain().split(b"\n")[:-1]
    gap = json.loads(tail[0])
    assert gap["event"]["action"] == "audit-gap" and gap["agentpen"]["gap"]["lost"] == 4
    assert "stalled" in gap["agentpen"]["gap"]["error"]
    lines = got.split(b"\n")[:-1] + tail
    assert verify_lines(lines, partial=True).ok  # gap-free but for the declared gap
    stream.close()
    os.close(r)


def test_journald_that_stops_reading_is_a_bounded_wait_then_a_gap(journal, monkeypatch):
    from agentpen.supervisor.audit import sinks

    monkeypatch.setattr(sinks, "FD_STALL_TIMEOUT_S", 0.3)
    path, server = journal
    stream = AuditStream("s", [JournaldSink(path)])
    n = 0
    while stream.healthy:  # journald's queue fills up
        n += 1
        t0 = time.monotonic()
        stream.emit(info(n), sender="supervisor", pid=None)
        assert time.monotonic() - t0 < 2.0 and n < 100000
    t0 = time.monotonic()
    stream.emit(info(0), sender="supervisor", pid=None)  # stalled: no second wait
    assert time.monotonic() - t0 < 0.2
    received = []
    server.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            received.append(parse_native(server.recv(1 << 20)))
    stream.emit(info(-1), sender="supervisor", pid=None)
    assert stream.healthy
    server.setblocking(True)
    gap = recv_journal(server)
    assert gap["AGENTPEN_ACTION"] == b"audit-gap"
    assert json.loads(gap["AGENTPEN_ECS"])["agentpen"]["gap"]["lost"] == 2
    assert [int(f["AGENTPEN_SEQUENCE"]) for f in received] == list(range(1, len(received) + 1))
    stream.close()


def test_a_line_torn_in_a_pipe_is_ended_before_the_next_record():
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: a one-page pipe
    sink = FdSink(w)
    sink.stall_timeout = 0.1
    stream = AuditStream("s", [sink])
    big = make_event("session-started", "s", type=["start"], process={"args": ["a" * 10000]})
    stream.emit(big, sender="supervisor", pid=None)  # 4 KiB go out, then the reader stalls
    assert not stream.healthy
    os.set_blocking(r, False)
    torn = os.read(r, 1 << 16)
    assert 0 < len(torn) < 10000 and b"\n" not in torn
    stream.emit(info(2), sender="supervisor", pid=None)
    assert stream.healthy
    rest = os.read(r, 1 << 16)
    assert rest.startswith(b"\n")  # the torn line is ended, not glued to the next one
    gap, ev = (json.loads(x) for x in rest[1:].split(b"\n")[:-1])
    assert gap["agentpen"]["gap"]["first"] == 1 and ev["event"]["sequence"] == 3
    stream.close()
    os.close(r)


def test_state_dir_is_agentpens_own_state_directory(tmp_path):
    state = tmp_path / "state" / "agentpen"  # as supervisor.resolve.state_dir returns it
    (sink,) = open_sinks(None, None, session_id="sid", state_dir=str(state))
    sink.close()
    assert os.path.dirname(sink.path) == str(state / "audit")
    assert stat.S_IMODE((state / "audit").stat().st_mode) == 0o700
