"""The supervisor <-> worker channel: framed, typed, versioned messages on a socketpair.

Wire format (docs/protocol.md): one message per SOCK_SEQPACKET packet, so the kernel
keeps the framing and file descriptors (SCM_RIGHTS) travel with the message they
belong to::

    b"AP" | version:u8 | type:u8 | body: UTF-8 JSON object

A body larger than ``MAX_INLINE`` travels in a sealed memfd attached to the packet
(``{"$blob": true}``), so a 10,000-name allowlist needs no chunking. The receiving
side turns on SO_PASSCRED, so every message carries the sender's pid, uid and gid
as the kernel saw them (SCM_CREDENTIALS): the supervisor stamps events with that
pid rather than with anything a worker claims.
"""

from __future__ import annotations

import array
import enum
import json
import os
import socket
import struct

from agentpen.core.record import field, record

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 1
MAGIC = b"AP"
HEADER = struct.Struct("!2sBB")
MAX_INLINE = 60 * 1024
MAX_PACKET = MAX_INLINE + HEADER.size
MAX_FDS = 16
MAX_BLOB = 64 * 1024 * 1024

_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid


class MsgType(enum.IntEnum):
    HELLO = 1  # worker -> supervisor: role, pid, protocol version
    CONFIG = 2  # supervisor -> worker: the resolved session policy
    EVENT = 3  # worker -> supervisor: one structured event for the audit stream
    STATUS = 4  # worker -> supervisor: state changes (ready, verified, child pid, exit)
    FDS = 5  # either way: file descriptors (SCM_RIGHTS) with their names
    CONTROL = 6  # supervisor -> worker: an instruction (go, deny-new, shutdown)
    ACK = 7  # supervisor -> worker: an event was recorded (or refused)


def _unserializable(o: object) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


# One encoder for every message: json.dumps() builds a JSONEncoder and a C encoder per
# call. Same bytes as json.dumps(body, separators=(",", ":"), ensure_ascii=False), minus
# the circular-reference check: bodies are trees of dicts, lists and scalars (a cycle would
# end in RecursionError rather than ValueError).
if json.encoder.c_make_encoder is not None:
    _C_ENCODER = json.encoder.c_make_encoder(
        None, _unserializable, json.encoder.encode_basestring, None, ":", ",", False, False, True)

    def _dumps(body: dict[str, Any]) -> str:
        return "".join(_C_ENCODER(body, 0))
else:  # pragma: no cover - CPython always has the C accelerator
    _dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

_BY_VALUE = {int(t): t for t in MsgType}  # a dict lookup, not an Enum call, per message
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_ANC_SIZE = socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(MAX_FDS * 4)


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


@record
class Message:
    type: MsgType
    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)
    sender_pid: int | None = None
    sender_uid: int | None = None

    # Written out: one per message on the proxy's per-connection path (record's generic
    # __init__ takes a few microseconds more).
    def __init__(self, type: MsgType, body: dict[str, Any], fds: list[int] | None = None,
                 sender_pid: int | None = None, sender_uid: int | None = None) -> None:
        self.type, self.body, self.fds = type, body, [] if fds is None else fds
        self.sender_pid, self.sender_uid = sender_pid, sender_uid

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)


class Channel:
    """One end of a worker link. Blocking unless the socket was made non-blocking."""

    def __init__(self, sock: socket.socket, *, passcred: bool = True) -> None:
        if sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("a channel needs a SOCK_SEQPACKET socket")
        self.sock = sock
        if passcred:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- sending ---------------------------------------------------------------

    def send(self, mtype: MsgType, body: dict[str, Any] | None = None,
             fds: tuple[int, ...] | list[int] = ()) -> None:
        """Send one message. Raises BlockingIOError on a full non-blocking socket."""
        packet, all_fds, blob = encode(mtype, body or {}, fds)
        try:
            anc = []
            if all_fds:
                anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", all_fds)))
            self.sock.sendmsg([packet], anc)
        finally:
            if blob is not None:
                os.close(blob)

    # -- receiving -------------------------------------------------------------

    def recv(self) -> Message | None:
        """Receive one message; None when the peer has closed its end."""
        data, anc, flags, _ = self.sock.recvmsg(MAX_PACKET, _ANC_SIZE)
        fds: list[int] = []
        pid = uid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - (len(payload) % 4)])
                fds.extend(arr)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, _gid = _CREDS.unpack(payload[: _CREDS.size])
        if not data and not fds:
            return None
        try:
            if flags & _TRUNCATED:
                raise ProtocolError("truncated packet or control data")
            msg = decode(data, fds)
        except Exception:
            for fd in fds:
                os.close(fd)
            raise
        msg.sender_pid, msg.sender_uid = pid, uid
        return msg


def encode(mtype: MsgType, body: dict[str, Any],
           fds: tuple[int, ...] | list[int] = ()) -> tuple[bytes, list[int], int | None]:
    """Build a packet. Returns (packet, fds to attach, blob fd the caller must close)."""
    raw = _dumps(body).encode()
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(mtype))
    all_fds = list(fds)
    if len(all_fds) > MAX_FDS - 1:
        raise ValueError(f"at most {MAX_FDS - 1} descriptors per message")
    blob = None
    if len(raw) > MAX_INLINE:
        if len(raw) > MAX_BLOB:
            raise ValueError("message body too large")
        blob = os.memfd_create("agentpen-blob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(blob, raw)
        import fcntl

        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        fcntl.fcntl(blob, fcntl.F_ADD_SEALS, seals)
        all_fds.append(blob)
        raw = b'{"$blob":true}'
    return head + raw, all_fds, blob


def decode(data: bytes, fds: list[int]) -> Message:
    if len(data) < HEADER.size:
        raise ProtocolError("short packet")
    magic, version, mtype = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("bad magic")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    kind = _BY_VALUE.get(mtype)
    if kind is None:
        raise ProtocolError(f"unknown message type {mtype}")
    try:
        body = json.loads(data[HEADER.size :])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("body is not a JSON object")
    if body.get("$blob") is True:
        if not fds:
            raise ProtocolError("blob message without its descriptor")
        blob = fds.pop()
        try:
            size = os.fstat(blob).st_size
            if size > MAX_BLOB:
                raise ProtocolError("blob too large")
            raw = os.pread(blob, size, 0)
        finally:
            os.close(blob)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ProtocolError(f"blob is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError("blob is not a JSON object")
    return Message(kind, body, fds)


def channel_pair() -> tuple[Channel, Channel]:
    """(supervisor end, worker end). Both close-on-exec; make the worker end
    inheritable explicitly where it must cross an exec."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Channel(a), Channel(b)
