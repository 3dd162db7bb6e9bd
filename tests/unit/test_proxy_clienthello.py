"""ClientHello parser: real hellos from Python ssl, openssl, curl and node, synthetic
edge cases (fragmented handshakes, post-quantum key shares, smuggling attempts) and
hypothesis properties (only ClientHelloError, bounded, split-invariant)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import ssl
import struct
import subprocess

import pytest
from agentpen.workers.proxy.clienthello import (
    MAX_HANDSHAKE,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# -- builders -----------------------------------------------------------------


def ext(etype: int, data: bytes) -> bytes:
    return struct.pack("!HH", etype, len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def key_share_ext(shares: list[tuple[int, int]]) -> bytes:
    body = b"".join(struct.pack("!HH", g, n) + os.urandom(n) for g, n in shares)
    return ext(0x0033, struct.pack("!H", len(body)) + body)


def hello_body(extensions: list[bytes] | None, *, session_id: bytes = b"\x00" * 32) -> bytes:
    body = b"\x03\x03" + os.urandom(32) + bytes([len(session_id)]) + session_id
    body += b"\x00\x04\x13\x01\x13\x02" + b"\x01\x00"
    if extensions is not None:
        blob = b"".join(extensions)
        body += struct.pack("!H", len(blob)) + blob
    return body


def handshake(body: bytes, hs_type: int = 1) -> bytes:
    return bytes([hs_type]) + len(body).to_bytes(3, "big") + body


def records(hs: bytes, size: int = 16384, rtype: int = 22) -> bytes:
    out = b""
    for i in range(0, len(hs), size):
        frag = hs[i : i + size]
        out += struct.pack("!BHH", rtype, 0x0301, len(frag)) + frag
    return out


def build_hello(sni: bytes | None = b"api.example.com", extra: list[bytes] | None = None,
                record_size: int = 16384) -> bytes:
    exts = ([sni_ext(sni)] if sni is not None else []) + (extra or [])
    return records(handshake(hello_body(exts)), record_size)


def parse(data: bytes) -> ClientHello | None:
    return ClientHelloParser().feed(data)


def parse_ok(data: bytes) -> ClientHello:
    res = parse(data)
    assert res is not None
    return res


# -- real clients ----------------------------------------------------------------


def python_ssl_hello(server_hostname: str | None) -> bytes:
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def capture(cmd_for_port) -> bytes:
    """Run a real client against a local socket that records its first flight."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(10)
        proc = subprocess.Popen(cmd_for_port(srv.getsockname()[1]), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            conn, _ = srv.accept()
            conn.settimeout(10)
            parser, data = ClientHelloParser(), b""
            with conn:
                while True:
                    chunk = conn.recv(65536)
                    assert chunk, "client closed before its ClientHello was complete"
                    data += chunk
                    if parser.feed(chunk) is not None:
                        return data
        finally:
            proc.kill()
            proc.wait(timeout=10)


CLIENTS = {
    "openssl": lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}",
                          "-servername", "API.Example.COM."],
    "curl": lambda p: ["curl", "-sk", "--max-time", "10", "--resolve",
                       f"api.example.com:{p}:127.0.0.1", f"https://api.example.com:{p}/"],
    "node": lambda p: ["node", "-e", "require('tls').connect({host:'127.0.0.1',port:" + str(p)
                       + ",servername:'api.example.com'}).on('error',()=>{})"],
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_real_client_hello(client: str) -> None:
    if shutil.which(client) is None:
        pytest.skip(f"{client} not installed")
    data = capture(CLIENTS[client])
    res = parse_ok(data)
    assert res.server_name == "api.example.com"
    assert not res.ech
    assert res.consumed == len(data)


def test_python_ssl_hello_and_split_everywhere() -> None:
    data = python_ssl_hello("Api.Example.com")
    assert parse_ok(data).server_name == "api.example.com"
    for cut in range(1, len(data)):
        p = ClientHelloParser()
        assert p.feed(data[:cut]) is None
        assert p.feed(data[cut:]).server_name == "api.example.com"


def test_python_ssl_no_sni() -> None:
    res = parse_ok(python_ssl_hello(None))
    assert res.server_name is None


def test_byte_by_byte() -> None:
    data = python_ssl_hello("api.example.com")
    p = ClientHelloParser()
    results = [p.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None and results[-1].server_name == "api.example.com"


def test_trailing_bytes_after_hello_are_not_read() -> None:
    data = python_ssl_hello("api.example.com")
    res = parse_ok(data + b"\x17\x03\x03\x00\x05hello" + b"\xff" * 100)
    assert res.consumed == len(data)


# -- synthetic ----------------------------------------------------------------------


def test_fragmented_across_records() -> None:
    data = build_hello(record_size=7)
    res = parse_ok(data)
    assert res.server_name == "api.example.com" and res.records > 10


def test_post_quantum_key_share_large_hello() -> None:
    # X25519MLKEM768 (0x11ec, 1216 bytes) + X25519 + a 2 KiB pad: ~3.4 KiB, spans 1 record
    # here and many when fragmented like some stacks do.
    extra = [key_share_ext([(0x11EC, 1216), (0x001D, 32)]), ext(0x0015, bytes(2048))]
    for size in (16384, 512, 1):
        res = parse_ok(build_hello(extra=extra, record_size=size))
        assert res.server_name == "api.example.com"
        assert res.handshake_length > 3300


def test_ech_reported_outer_sni_checked() -> None:
    res = parse_ok(build_hello(b"public.example.net", extra=[ext(0xFE0D, os.urandom(200))]))
    assert res.ech and res.server_name == "public.example.net"


def test_no_extensions_block() -> None:
    assert parse_ok(records(handshake(hello_body(None)))).server_name is None


def test_alpn_reported() -> None:
    alpn = b"\x02h2\x08http/1.1"
    res = parse_ok(build_hello(extra=[ext(0x10, struct.pack("!H", len(alpn)) + alpn)]))
    assert res.alpn == ("h2", "http/1.1")


def test_one_trailing_dot_stripped_only() -> None:
    assert parse_ok(build_hello(b"a.example.com.")).server_name == "a.example.com"
    with pytest.raises(ClientHelloError, match="empty label"):
        parse(build_hello(b"a.example.com.."))


@pytest.mark.parametrize(
    ("sni", "reason"),
    [
        (b"", "empty"),
        (b"a\x00.example.com", "control"),
        (b"a\x1b[31m.example.com", "control"),
        ("é.example.com".encode(), "not ASCII"),
        (b"a..example.com", "empty label"),
        (b".example.com", "empty label"),
        (b"-a.example.com", "letters"),
        (b"a_b.example.com", "letters"),
        (b"a b.example.com", "letters"),
        (b"a" * 64 + b".com", "label longer"),
        ((b"a" * 60 + b".") * 5 + b"com", "longer than 253"),
        (b"127.0.0.1", "IP address"),
        (b"evil.com/x", "letters"),
    ],
)
def test_invalid_sni(sni: bytes, reason: str) -> None:
    with pytest.raises(ClientHelloError, match=reason):
        parse(build_hello(sni))


def test_two_host_names_refused() -> None:
    data = records(handshake(hello_body([sni_ext(b"api.example.com", b"evil.com")])))
    with pytest.raises(ClientHelloError, match="more than one server_name"):
        parse(data)


def test_duplicate_sni_extension_refused() -> None:
    data = records(handshake(hello_body([sni_ext(b"api.example.com"), sni_ext(b"evil.com")])))
    with pytest.raises(ClientHelloError, match="duplicate extension"):
        parse(data)


def test_non_host_name_type_refused() -> None:
    with pytest.raises(ClientHelloError, match="not host_name"):
        parse(records(handshake(hello_body([sni_ext(b"api.example.com", name_type=1)]))))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x80\x2e\x01\x03\x01", "SSLv2"),
        (b"GET / HTTP/1.1\r\n", "record type"),
        (b"\x17\x03\x03\x00\x10", "record type"),
        (b"\x15\x03\x03\x00\x02\x02\x28", "record type"),
        (b"\x16\x02\x00\x00\x10", "not TLS"),
        (b"\x16\x03\x01\x00\x00", "zero-length"),
        (b"\x16\x03\x01\x40\x01", "exceeds"),
        (records(handshake(b"\x03\x03", hs_type=2)), "not ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "bound"),
    ],
)
def test_bad_records(data: bytes, reason: str) -> None:
    with pytest.raises(ClientHelloError, match=reason):
        parse(data)


def test_interleaved_non_handshake_record_refused() -> None:
    hs = handshake(hello_body([sni_ext(b"api.example.com")]))
    data = records(hs[:10]) + b"\x15\x03\x03\x00\x02\x02\x28" + records(hs[10:])
    with pytest.raises(ClientHelloError, match="record type 21"):
        parse(data)


def test_inconsistent_lengths() -> None:
    body = hello_body([sni_ext(b"api.example.com")])
    with pytest.raises(ClientHelloError, match="truncated"):
        parse(records(handshake(body[:-3])))  # extensions length claims more than present
    with pytest.raises(ClientHelloError, match="bytes after"):
        parse(records(handshake(body + b"\x00")))
    hs = handshake(body)
    with pytest.raises(ClientHelloError, match="after the ClientHello"):
        parse(records(hs + b"\x01\x00\x00\x00"))  # second handshake message, same record


def test_bound_on_fragmented_input() -> None:
    # 1-byte records of a 20 KiB hello need 6x the bytes: refused at MAX_HANDSHAKE input.
    data = build_hello(extra=[ext(0x15, bytes(20000))], record_size=1)
    p = ClientHelloParser()
    with pytest.raises(ClientHelloError, match="not complete within"):
        p.feed(data)
    assert p.consumed <= MAX_HANDSHAKE + 1


def test_largest_accepted_hello() -> None:
    hs_body_len = MAX_HANDSHAKE - 5 * 4 - 4  # four records of headers
    pad = hs_body_len - len(hello_body([sni_ext(b"api.example.com")])) - 4
    data = build_hello(extra=[ext(0x15, bytes(pad))])
    res = parse_ok(data)
    assert res.consumed == len(data) <= MAX_HANDSHAKE


# -- properties ---------------------------------------------------------------------

REAL = python_ssl_hello("api.example.com")
PROPS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed_all(chunks: list[bytes]) -> ClientHello | None:
    p = ClientHelloParser()
    res = None
    try:
        for c in chunks:
            res = p.feed(c)
            if res is not None:
                break
    finally:
        assert p.consumed <= MAX_HANDSHAKE
    return res


@PROPS
@given(st.binary(max_size=4096))
def test_random_bytes_only_clienthello_error(data: bytes) -> None:
    with contextlib.suppress(ClientHelloError):
        _feed_all([data])


@PROPS
@given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(REAL)))
def test_mutated_real_hello(mutations: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(REAL)
    for pos, val in mutations:
        buf[pos] = val
    with contextlib.suppress(ClientHelloError):
        _feed_all([bytes(buf[:cut]), bytes(buf[cut:])])


@PROPS
@given(st.binary(min_size=0, max_size=300), st.integers(1, 64))
def test_random_records_bounded(payload: bytes, size: int) -> None:
    data = records(handshake(payload), size) if payload else b"\x16\x03\x01"
    with contextlib.suppress(ClientHelloError):
        _feed_all([data, os.urandom(70000)])


@PROPS
@given(st.lists(st.integers(1, len(REAL) - 1), unique=True, max_size=20), st.integers(1, 300))
def test_any_split_same_result(cuts: list[int], record_size: int) -> None:
    data = records(REAL[5:], record_size)  # re-fragment the real handshake too
    expected = parse(data)
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert _feed_all(chunks) == expected
