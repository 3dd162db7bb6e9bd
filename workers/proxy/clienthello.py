"""Incremental, bounded, sans-IO parser for the first TLS flight: a ClientHello.

No sockets, no asyncio, no clock: the caller feeds bytes as they arrive and gets a
ClientHello once the whole handshake message is in, None while more is needed, or
ClientHelloError (a ValueError) for anything invalid. The caller keeps the raw bytes
it peeked (they are forwarded verbatim); the parser keeps only the partial record
header and the handshake bytes of the ClientHello itself.

Bound: the parser consumes at most MAX_HANDSHAKE bytes of input *including* record
headers, so a hello fragmented into 1-byte records cannot make it read more.
Anything after the ClientHello's last record is never looked at.

References: RFC 8446 sections 4.1.2 and 5.1, RFC 6066 section 3 (server_name),
draft-ietf-tls-esni (encrypted_client_hello, 0xfe0d).
"""

from __future__ import annotations

from dataclasses import dataclass

from agentpen.workers.proxy.names import canonical_host

MAX_HANDSHAKE = 64 * 1024

CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
EXT_ECH = 0xFE0D
NAME_TYPE_HOST = 0
MAX_RECORD = 1 << 14  # TLSPlaintext.length limit (RFC 8446 5.1)
_RECORD_HEADER = 5
_HS_HEADER = 4


class ClientHelloError(ValueError):
    """The bytes are not a well-formed ClientHello we are willing to judge."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None  # canonical host_name from SNI; None = no SNI (the caller blocks)
    ech: bool  # encrypted_client_hello present: server_name is the OUTER name
    alpn: tuple[str, ...]  # offered protocols, for the audit only (escaped, never trusted)
    legacy_version: int
    handshake_length: int  # bytes of the handshake message body
    records: int  # TLS records the hello arrived in
    consumed: int  # input bytes the parser read (<= MAX_HANDSHAKE)


class ClientHelloParser:
    """feed() bytes until it returns a ClientHello; raises ClientHelloError on bad input."""

    def __init__(self) -> None:
        self._head = bytearray()  # partial record header (< 5 bytes)
        self._hs = bytearray()  # handshake bytes collected from records so far
        self._record_left = 0  # payload bytes still to come in the current record
        self._hs_len: int | None = None  # body length from the handshake header
        self._records = 0
        self._consumed = 0
        self._result: ClientHello | None = None

    @property
    def consumed(self) -> int:
        return self._consumed

    def feed(self, data: bytes) -> ClientHello | None:
        if self._result is not None:
            return self._result
        if (self._consumed == 0 and len(data) >= _RECORD_HEADER + _HS_HEADER
                and data[0] == CONTENT_HANDSHAKE and data[1] == 3
                and data[_RECORD_HEADER] == HANDSHAKE_CLIENT_HELLO):
            # Fast path, the usual case: the whole ClientHello is the first record, exactly,
            # and it is all in this first read. Every header check below holds for it;
            # anything else takes the general path.
            rec_len = data[3] << 8 | data[4]
            hs_len = data[6] << 16 | data[7] << 8 | data[8]
            if (0 < rec_len <= MAX_RECORD and _HS_HEADER + hs_len == rec_len
                    and len(data) >= _RECORD_HEADER + rec_len):
                self._consumed = _RECORD_HEADER + rec_len
                self._records = 1
                self._result = self._parse_body(bytes(data[_RECORD_HEADER + _HS_HEADER:
                                                           _RECORD_HEADER + rec_len]))
                return self._result
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._record_left == 0:
                take = min(_RECORD_HEADER - len(self._head), len(view) - pos)
                self._account(take)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) < _RECORD_HEADER:
                    # Judge the first byte early: SSLv2 and non-TLS show at once.
                    self._check_record_prefix(self._head)
                    return None
                self._record_left = self._check_record_header(bytes(self._head))
                self._head.clear()
                self._records += 1
                continue
            take = min(self._record_left, len(view) - pos)
            # Never collect more handshake bytes than the message can have.
            if self._hs_len is not None and len(self._hs) + take > _HS_HEADER + self._hs_len:
                raise ClientHelloError("record carries data after the ClientHello")
            self._account(take)
            self._hs += view[pos : pos + take]
            pos += take
            self._record_left -= take
            if self._hs_len is None and len(self._hs) >= _HS_HEADER:
                self._hs_len = self._check_handshake_header(bytes(self._hs[:_HS_HEADER]))
            if self._hs_len is not None and len(self._hs) >= _HS_HEADER + self._hs_len:
                if self._record_left or len(self._hs) > _HS_HEADER + self._hs_len:
                    raise ClientHelloError("record carries data after the ClientHello")
                self._result = self._parse_body(bytes(self._hs[_HS_HEADER:]))
                self._hs = bytearray()
                return self._result
        return None

    # -- record and handshake headers -------------------------------------------

    def _account(self, n: int) -> None:
        self._consumed += n
        if self._consumed > MAX_HANDSHAKE:
            raise ClientHelloError(f"ClientHello not complete within {MAX_HANDSHAKE} bytes")

    @staticmethod
    def _check_record_prefix(head: bytearray) -> None:
        if not head:
            return
        if head[0] & 0x80:
            raise ClientHelloError("SSLv2-format hello (refused)")
        if head[0] != CONTENT_HANDSHAKE:
            raise ClientHelloError(f"TLS record type {head[0]} where a handshake was expected")
        if len(head) >= 2 and head[1] != 3:
            raise ClientHelloError(f"record version major {head[1]} is not TLS (3)")

    def _check_record_header(self, head: bytes) -> int:
        self._check_record_prefix(bytearray(head))
        length = int.from_bytes(head[3:5], "big")
        if length == 0:
            raise ClientHelloError("zero-length handshake record")
        if length > MAX_RECORD:
            raise ClientHelloError(f"record length {length} exceeds {MAX_RECORD}")
        return length

    @staticmethod
    def _check_handshake_header(head: bytes) -> int:
        if head[0] != HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError(f"handshake type {head[0]} is not ClientHello")
        length = int.from_bytes(head[1:4], "big")
        if _HS_HEADER + length > MAX_HANDSHAKE - _RECORD_HEADER:
            raise ClientHelloError(f"ClientHello length {length} exceeds the {MAX_HANDSHAKE} bound")
        return length

    # -- ClientHello body -------------------------------------------------------

    def _parse_body(self, body: bytes) -> ClientHello:
        """Walk a well-formed body with plain indices; at the first anomaly hand over to
        _parse_body_checked(), which walks it again and raises the precise error. It
        returns only after every check of the checked walk held."""
        b = body
        n = len(b)
        if n < 35 or b[0] != 3:  # legacy_version (major 3) + random + session_id length
            return self._parse_body_checked(body)
        p = 35 + b[34]
        if b[34] > 32 or p + 2 > n:
            return self._parse_body_checked(body)
        suites = b[p] << 8 | b[p + 1]
        p += 2 + suites
        if not suites or suites % 2 or p + 1 > n:
            return self._parse_body_checked(body)
        methods = b[p]
        p += 1 + methods
        if not methods or p > n:
            return self._parse_body_checked(body)
        server_name: str | None = None
        alpn: tuple[str, ...] = ()
        ech = False
        if p < n:
            if p + 2 > n or p + 2 + (b[p] << 8 | b[p + 1]) != n:
                return self._parse_body_checked(body)  # truncated, or bytes after them
            p += 2
            seen: set[int] = set()
            while p < n:
                if p + 4 > n:
                    return self._parse_body_checked(body)
                ext_type = b[p] << 8 | b[p + 1]
                end = p + 4 + (b[p + 2] << 8 | b[p + 3])
                if end > n or ext_type in seen:
                    return self._parse_body_checked(body)
                seen.add(ext_type)
                if ext_type == EXT_SERVER_NAME:
                    server_name = _parse_sni(b[p + 4 : end])
                elif ext_type == EXT_ALPN:
                    alpn = _parse_alpn(b[p + 4 : end])
                elif ext_type == EXT_ECH:
                    ech = True
                p = end
        return ClientHello(
            server_name=server_name,
            ech=ech,
            alpn=alpn,
            legacy_version=b[0] << 8 | b[1],
            handshake_length=n,
            records=self._records,
            consumed=self._consumed,
        )

    def _parse_body_checked(self, body: bytes) -> ClientHello:
        r = _Reader(body)
        legacy_version = r.u16("legacy_version")
        if legacy_version >> 8 != 3:
            raise ClientHelloError(f"ClientHello version {legacy_version:#06x} is not TLS")
        r.take(32, "random")
        session_id = r.vec(1, "session_id")
        if len(session_id) > 32:
            raise ClientHelloError("session_id longer than 32 bytes")
        suites = r.vec(2, "cipher_suites")
        if not suites or len(suites) % 2:
            raise ClientHelloError("cipher_suites empty or of odd length")
        if not r.vec(1, "compression_methods"):
            raise ClientHelloError("no compression method")
        server_name: str | None = None
        alpn: tuple[str, ...] = ()
        ech = False
        if r.left():  # extensions are optional before TLS 1.3 (no SNI then)
            exts = _Reader(r.vec(2, "extensions"))
            if r.left():
                raise ClientHelloError("bytes after the extensions block")
            seen: set[int] = set()
            while exts.left():
                ext_type = exts.u16("extension type")
                data = exts.vec(2, "extension data")
                if ext_type in seen:
                    raise ClientHelloError(f"duplicate extension {ext_type:#06x}")
                seen.add(ext_type)
                if ext_type == EXT_SERVER_NAME:
                    server_name = _parse_sni(data)
                elif ext_type == EXT_ALPN:
                    alpn = _parse_alpn(data)
                elif ext_type == EXT_ECH:
                    ech = True
        return ClientHello(
            server_name=server_name,
            ech=ech,
            alpn=alpn,
            legacy_version=legacy_version,
            handshake_length=len(body),
            records=self._records,
            consumed=self._consumed,
        )


def _parse_sni(data: bytes) -> str:
    r = _Reader(data)
    names = _Reader(r.vec(2, "server_name_list"))
    if r.left():
        raise ClientHelloError("bytes after server_name_list")
    if not names.left():
        raise ClientHelloError("empty server_name_list")
    name_type = names.u8("name_type")
    raw = names.vec(2, "host_name")
    if names.left():
        # RFC 6066 allows one name per type and host_name is the only type:
        # a second entry can only be there to confuse one reader or another.
        raise ClientHelloError("more than one server_name entry")
    if name_type != NAME_TYPE_HOST:
        raise ClientHelloError(f"server_name type {name_type} is not host_name")
    try:
        return canonical_host(raw.decode("ascii"))
    except UnicodeDecodeError:
        raise ClientHelloError("SNI host_name is not ASCII") from None
    except ValueError as exc:
        raise ClientHelloError(f"SNI host_name invalid: {exc}") from None


def _parse_alpn(data: bytes) -> tuple[str, ...]:
    r = _Reader(data)
    lst = _Reader(r.vec(2, "alpn list"))
    if r.left():
        raise ClientHelloError("bytes after the ALPN list")
    out = []
    while lst.left():
        proto = lst.vec(1, "alpn protocol")
        if not proto:
            raise ClientHelloError("empty ALPN protocol name")
        out.append(proto.decode("ascii", "backslashreplace"))
    return tuple(out)


class _Reader:
    """Bounds-checked cursor over one immutable buffer."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes) -> None:
        self._buf = buf
        self._pos = 0

    def left(self) -> int:
        return len(self._buf) - self._pos

    # Hot path (every connection): bounds checks inline, no helper calls.
    def take(self, n: int, what: str) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            raise ClientHelloError(f"truncated {what}: need {n} bytes, have {len(self._buf) - pos}")
        self._pos = end
        return self._buf[pos:end]

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def vec(self, width: int, what: str) -> bytes:
        pos = self._pos
        if pos + width > len(self._buf):
            raise ClientHelloError(f"truncated {what} length: need {width} bytes, "
                                   f"have {len(self._buf) - pos}")
        n = int.from_bytes(self._buf[pos : pos + width], "big")
        self._pos = pos + width
        return self.take(n, what)
