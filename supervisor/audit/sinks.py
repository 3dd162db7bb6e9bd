"""Where audit lines go: a JSON-lines file, an inherited descriptor (--audit-fd), or
journald's native socket. Mechanism only: a sink writes one complete line per call
and raises OSError when it cannot; AuditStream (stream.py) decides what that means.
"""

from __future__ import annotations

import array
import errno
import os
import re
import select
import signal
import socket
import stat
import struct
import time

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
ROTATION_CHECK_S = 1.0
FD_STALL_TIMEOUT_S = 2.0  # the longest the supervisor waits for a --audit-fd reader


class AuditSinkError(Exception):
    """A sink cannot be opened as asked; the session must not start."""


class Sink:
    """One destination. ``write`` takes one complete line (and the record it came
    from, for sinks that keep fields apart); it either writes the whole line or raises."""

    name = "sink"
    needs_sync = False  # whether fsync means anything for this destination

    def write(self, line: bytes, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """For the user: where the stream goes."""
        return self.name

    def sync(self) -> None:
        """Make what was written durable. Raises OSError."""

    def check_rotated(self, now: float) -> bool:
        """Reopen if the path now names another file (logrotate). True if reopened."""
        return False

    def reopen(self) -> None:
        """Reopen on demand (SIGHUP), or before a retry after a failure."""

    def close(self) -> None:
        """Release the destination; errors are the caller's to count."""


class _FdWriter(Sink):
    """Shared by file and descriptor sinks: one write() per line in the normal case."""

    fd: int
    regular: bool
    partial: bool

    def _write_all(self, line: bytes) -> None:
        data = line
        if self.partial:
            # A torn line is still in a stream we could not truncate: end it so that
            # the next record starts on its own line (the torn one then fails to parse
            # loudly, and the audit-gap record that follows says what was lost).
            data = b"\n" + line
        done = 0
        deadline: float | None = None
        try:
            while done < len(data):
                try:
                    done += os.write(self.fd, data[done:] if done else data)
                except BlockingIOError:
                    deadline = self._wait_writable(deadline)
                    continue
                if done < len(data) and self.regular:
                    # A short write to a regular file means the disk is full.
                    raise OSError(errno.ENOSPC, "short write")
        except OSError:
            if done:
                self._untear(done, data)
            raise
        self.partial = False
        self.stalled = False

    stall_timeout = 0.0
    stalled = False

    def _wait_writable(self, deadline: float | None) -> float:
        """A full pipe: wait for the reader, but only so long (a stalled reader must
        not freeze the supervisor); once it has stalled, later writes do not wait
        until one gets through."""
        now = time.monotonic()
        if deadline is None:
            deadline = now + (0.0 if self.stalled else self.stall_timeout)
        remaining = deadline - now
        if remaining > 0:
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            if poller.poll(remaining * 1000):
                return deadline
        self.stalled = True
        raise OSError(errno.ETIMEDOUT, f"reader stalled for {self.stall_timeout:g} s")

    def _untear(self, written: int, data: bytes) -> None:
        """Remove the partial line we just appended, if it is still the file's tail."""
        if self.regular:
            try:
                size = os.fstat(self.fd).st_size
                if size >= written and os.pread(self.fd, written, size - written) == data[:written]:
                    os.ftruncate(self.fd, size - written)
                    return
            except OSError:
                pass
        self.partial = True

    def sync(self) -> None:
        if self.needs_sync:
            os.fsync(self.fd)


def _readable(fd: int) -> int:
    """The same regular file, opened read-write as well: removing a torn line after a
    short write checks the file's tail first (pread), which O_WRONLY forbids. Opened
    through /proc rather than by path so it is surely the same file; a FIFO is never
    opened for reading (that would make us its reader)."""
    try:
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return fd  # no /proc: a torn line is then ended with a newline instead
    os.close(fd)
    return rw


def _check_not_terminal(fd: int, what: str) -> os.stat_result:
    if os.isatty(fd):
        raise AuditSinkError(f"{what} is a terminal: the audit stream never goes to a terminal "
                             "(the agent could write to it too)")
    return os.fstat(fd)


class FileSink(_FdWriter):
    """A JSON-lines file: O_APPEND, mode 0600, parents created 0700, reopened when rotated."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.name = f"file:{self.path}"
        self.fd = -1
        self.partial = False
        self.regular = True
        self.needs_sync = True
        self._last_check = 0.0
        self._open()

    def _open(self) -> None:
        _make_parents(os.path.dirname(self.path))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise AuditSinkError(f"cannot open audit log {self.path}: {exc.strerror}") from exc
        try:
            st = _check_not_terminal(fd, self.path)
            self.regular = stat.S_ISREG(st.st_mode)
            self.needs_sync = self.regular
            if self.regular:
                if st.st_uid != os.geteuid():
                    raise AuditSinkError(f"audit log {self.path} belongs to uid {st.st_uid}, "
                                         "not to us: refusing to append to it")
                # An existing file that others could read is tightened rather than
                # refused: it is ours, and its lines name every host the agent reached.
                if stat.S_IMODE(st.st_mode) != 0o600:
                    os.fchmod(fd, 0o600)
                fd = _readable(fd)
        except BaseException:
            os.close(fd)
            raise
        old, self.fd = self.fd, fd
        self.partial = False
        self._ident = (st.st_dev, st.st_ino)
        if old >= 0:
            os.close(old)

    def write(self, line: bytes, record: dict[str, Any]) -> None:
        self._write_all(line)

    def describe(self) -> str:
        return self.path

    def check_rotated(self, now: float) -> bool:
        if now - self._last_check < ROTATION_CHECK_S:
            return False
        self._last_check = now
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                return False
        except FileNotFoundError:
            pass
        self.reopen()
        return True

    def reopen(self) -> None:
        if self.fd >= 0 and self.needs_sync:
            os.fsync(self.fd)  # what went to the old file stays durable
        try:
            self._open()
        except AuditSinkError as exc:
            cause = exc.__cause__
            raise OSError(getattr(cause, "errno", errno.EIO), str(exc)) from exc

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class FdSink(_FdWriter):
    """--audit-fd N: a pipe or file the caller opened (Vector, Fluent Bit, a file)."""

    def __init__(self, fd: int) -> None:
        self.name = f"fd:{fd}"
        self.partial = False
        if fd in (0, 1, 2):
            raise AuditSinkError(f"--audit-fd {fd}: the agent shares descriptors 0-2 and could "
                                 "write forged lines into them; pass another descriptor")
        try:
            st = _check_not_terminal(fd, f"--audit-fd {fd}")
            mode = _fcntl_getfl(fd)
        except OSError as exc:
            raise AuditSinkError(f"--audit-fd {fd}: {exc.strerror}") from exc
        if mode & os.O_ACCMODE == os.O_RDONLY:
            raise AuditSinkError(f"--audit-fd {fd} is not open for writing")
        for std in (0, 1, 2):
            try:
                other = os.fstat(std)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino) and not stat.S_ISCHR(
                    st.st_mode):
                raise AuditSinkError(f"--audit-fd {fd} is the same file or pipe as descriptor "
                                     f"{std}, which the agent shares")
        self.fd = fd
        self.regular = stat.S_ISREG(st.st_mode)
        self.needs_sync = self.regular
        if self.regular and not mode & os.O_APPEND:
            _fcntl_setfl(fd, mode | os.O_APPEND)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            # Non-blocking, so a reader that stops reading costs at most
            # stall_timeout per outage rather than the whole session loop.
            _fcntl_setfl(fd, _fcntl_getfl(fd) | os.O_NONBLOCK)
            self.stall_timeout = FD_STALL_TIMEOUT_S
        os.set_inheritable(fd, False)  # never into a worker or the sandbox
        # A vanished reader must be an EPIPE we count, not a SIGPIPE that kills the
        # supervisor (Python ignores SIGPIPE, but an embedding program may not).
        if signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL:
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def write(self, line: bytes, record: dict[str, Any]) -> None:
        self._write_all(line)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _fcntl_getfl(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _fcntl_setfl(fd: int, flags: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


# -- journald -------------------------------------------------------------------------


def journal_field(name: str, value: str | bytes) -> bytes:
    """One field in journald's native protocol: ``NAME=value\\n``, or the binary-safe
    form ``NAME\\n<u64 le length><value>\\n`` when the value holds a newline."""
    data = value.encode("utf-8", "backslashreplace") if isinstance(value, str) else value
    key = name.encode()
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def journal_datagram(line: bytes, record: dict[str, Any]) -> bytes:
    event = record["event"]
    parts = [
        journal_field("MESSAGE", record.get("message", "")),
        journal_field("PRIORITY", str(_SYSLOG_PRIORITY.get(record["log"]["level"], 6))),
        journal_field("SYSLOG_IDENTIFIER", "agentpen"),
        journal_field("AGENTPEN_SESSION_ID", record["labels"]["session_id"]),
        journal_field("AGENTPEN_ACTION", event["action"]),
        journal_field("AGENTPEN_SEQUENCE", str(event["sequence"])),
        journal_field("AGENTPEN_WORKER", record["agentpen"]["worker"]),
        journal_field("AGENTPEN_ECS", line.rstrip(b"\n")),  # the whole line, for SIEMs
    ]
    return b"".join(parts)


class JournaldSink(Sink):
    """journald's native protocol on its datagram socket, no extra dependency. A
    datagram too large for the socket travels in a sealed memfd, as journald expects.
    ``sync`` is journald's business (it syncs on its own schedule)."""

    needs_sync = False
    stalled = False

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.name = f"journald:{path}"
        self.sock: socket.socket | None = None
        try:
            self._connect()
        except OSError as exc:
            raise AuditSinkError(f"journald socket {path}: {exc.strerror or exc}") from exc

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        if self.sock is not None:
            self.sock.close()
        self.sock = sock

    def write(self, line: bytes, record: dict[str, Any]) -> None:
        if self.sock is None:
            self._connect()
        assert self.sock is not None
        data = journal_datagram(line, record)
        # journald's queue full: wait so long, then fail (and not wait again until a
        # datagram gets through), as for a stalled --audit-fd reader.
        self.sock.settimeout(0.0 if self.stalled else FD_STALL_TIMEOUT_S)
        try:
            try:
                self.sock.send(data)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(data)
        except (TimeoutError, BlockingIOError) as exc:
            self.stalled = True
            raise OSError(errno.ETIMEDOUT, "journald is not reading") from exc
        self.stalled = False

    def _send_memfd(self, data: bytes) -> None:
        import fcntl

        assert self.sock is not None
        fd = os.memfd_create("agentpen-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [fd]))])
        finally:
            os.close(fd)

    def describe(self) -> str:
        return "journald (journalctl SYSLOG_IDENTIFIER=agentpen)"

    def reopen(self) -> None:
        self._connect()  # journald restarted: its socket is a new one

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- opening --------------------------------------------------------------------------


def _make_parents(path: str, *, tighten: bool = False) -> None:
    """Create missing directories 0700 (umask cannot loosen them); with `tighten`,
    also restrict existing ones that we own (agentpen's own state directory)."""
    missing = []
    cur = path
    while cur and not os.path.isdir(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise AuditSinkError(f"cannot create {d}: {exc.strerror}") from exc
        os.chmod(d, 0o700)
    if tighten:
        st = os.stat(path)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o700)


def default_audit_dir(state_dir: str | None = None) -> str:
    """`state_dir`/audit, where `state_dir` is agentpen's state directory (the
    supervisor's resolve.state_dir: $XDG_STATE_HOME/agentpen); without it,
    $XDG_STATE_HOME/agentpen/audit (~/.local/state when unset or not absolute)."""
    if state_dir:
        return os.path.join(os.path.abspath(state_dir), "audit")
    base = os.environ.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "agentpen", "audit")


def default_audit_path(session_id: str, state_dir: str | None = None,
                       now: float | None = None) -> str:
    if not _SESSION_ID.fullmatch(session_id):
        raise AuditSinkError(f"session id {session_id!r} cannot name a file")
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    return os.path.join(default_audit_dir(state_dir), f"{day}-{session_id}.jsonl")


def open_sinks(spec: str | None, fd: int | None, *, session_id: str,
               state_dir: str | None = None) -> list[Sink]:
    """The sinks for --audit-log SPEC and --audit-fd FD. Raises AuditSinkError, having
    closed whatever it had opened, when any of them cannot be used."""
    sinks: list[Sink] = []
    try:
        if spec is None:
            path = default_audit_path(session_id, state_dir)
            _make_parents(os.path.dirname(path), tighten=True)
            sinks.append(FileSink(path))
        elif spec == "journald":
            sinks.append(JournaldSink())
        elif not spec:
            raise AuditSinkError("--audit-log needs a path or 'journald'")
        else:
            sinks.append(FileSink(spec))
        if fd is not None:
            sinks.append(FdSink(fd))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def sink_paths(sinks: list[Sink]) -> list[str]:
    """Real paths of file sinks, for the supervisor to check that none of them is
    visible inside the sandbox (project, mounts)."""
    return [os.path.realpath(s.path) for s in sinks if isinstance(s, FileSink)]
