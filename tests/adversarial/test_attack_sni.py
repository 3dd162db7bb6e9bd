"""Attack battery, SNI tricks through the real proxy: hand-made ClientHellos sent by a probe
inside the sandbox to the one door (127.0.0.1:443). A hello passes only when its one
host_name, normalised (lowercase, one trailing dot dropped), is exactly an allowed name.

Each verdict is read three ways: the audit stream (connection-allowed/denied for the
probe's source port), what the probe got back (the proxy's access_denied alert, or the
upstream's own TLS answer), and how many connections reached the upstream."""

from __future__ import annotations

import os
import socket
import struct
import threading

ALLOWED = "api.example.com"


def _ext(typ: int, body: bytes) -> bytes:
    return struct.pack("!HH", typ, len(body)) + body


def _sni(names: list[bytes], name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + struct.pack("!H", len(n)) + n for n in names)
    return _ext(0x0000, struct.pack("!H", len(entries)) + entries)


def handshake(names: list[bytes] | None, pad: int = 0, name_type: int = 0, suites: int = 1) -> bytes:
    """A TLS 1.3 ClientHello handshake message. Extensions are capped at 65535 bytes by
    their length field, so past that size comes from `suites` cipher suites."""
    exts = _sni(names, name_type) if names is not None else b""
    exts += _ext(0x000A, b"\x00\x02\x00\x1d")  # supported_groups: x25519
    exts += _ext(0x000D, b"\x00\x04\x08\x04\x04\x01")  # signature_algorithms: rsa_pss, rsa_pkcs1
    exts += _ext(0x002B, b"\x02\x03\x04")  # supported_versions: TLS 1.3
    exts += _ext(0x0033, struct.pack("!HHH", 36, 0x001D, 32) + os.urandom(32))  # key_share
    if pad:
        exts += _ext(0x0015, b"\0" * pad)  # padding (RFC 7685)
    ciphers = b"\x0a\x0a" * (suites - 1) + b"\x13\x01"  # GREASE values, then TLS_AES_128_GCM_SHA256
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
            + struct.pack("!H", len(ciphers)) + ciphers + b"\x01\x00" + struct.pack("!H", len(exts)) + exts)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(hs: bytes, size: int = 1 << 14) -> bytes:
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", len(hs[i : i + size])) + hs[i : i + size]
                    for i in range(0, len(hs), size))


def hello(names: list[bytes] | None, **kw) -> bytes:
    return records(handshake(names, **kw))


A = ALLOWED.encode()
LONG = (b"a" * 63 + b".") * 4 + A  # 271 characters of valid labels: over the 253 limit

# name -> (bytes sent, write size (0 = at once), allowed?)
CASES: dict[str, tuple[bytes, int, bool]] = {
    "exact": (hello([A]), 0, True),
    "upper_case": (hello([A.upper()]), 0, True),
    "mixed_case": (hello([b"Api.Example.Com"]), 0, True),
    "trailing_dot": (hello([A + b"."]), 0, True),
    "byte_records": (records(handshake([A]), 1), 0, True),
    "byte_writes": (hello([A]), 1, True),
    "huge_60k": (hello([A], pad=60_000), 0, True),
    "two_trailing_dots": (hello([A + b".."]), 0, False),
    "leading_dot": (hello([b"." + A]), 0, False),
    "long_300": (hello([LONG]), 0, False),
    "nul_suffix": (hello([A + b"\x00.evil.example.net"]), 0, False),
    "nul_prefix": (hello([b"evil.example.net\x00" + A]), 0, False),
    "escape": (hello([A + b"\x1b[0m"]), 0, False),
    "newline": (hello([A + b"\n"]), 0, False),
    "percent": (hello([b"api%2eexample.com"]), 0, False),
    "backslash": (hello([b"api\\.example.com"]), 0, False),
    "space": (hello([A + b" "]), 0, False),
    "utf8_homograph": (hello(["\u0430pi.example.com".encode()]), 0, False),
    "punycode_other": (hello([b"xn--pi-7kc.example.com"]), 0, False),
    "two_names_evil_first": (hello([b"evil.example.net", A]), 0, False),
    "two_names_allowed_first": (hello([A, b"evil.example.net"]), 0, False),
    "same_name_twice": (hello([A, A]), 0, False),
    "no_sni": (hello(None), 0, False),
    "empty_sni": (hello([b""]), 0, False),
    "name_type_1": (hello([A], name_type=1), 0, False),
    "subdomain": (hello([b"x." + A]), 0, False),
    "parent": (hello([b"example.com"]), 0, False),
    "suffix_glued": (hello([b"x" + A]), 0, False),
    "allowed_as_prefix": (hello([A + b".evil.example.net"]), 0, False),
    "ip_literal": (hello([b"127.0.0.1"]), 0, False),
    "evil_byte_records": (records(handshake([b"evil.example.net"]), 1), 0, False),
    "over_64k": (hello([A], pad=40_000, suites=13_000), 0, False),
    "sslv2": (b"\x80\x2e\x01\x00\x02" + b"\x00" * 45, 0, False),
    "app_data_first": (b"\x17\x03\x03\x00\x05hello", 0, False),
}


def test_sni_tricks_allowed_only_when_the_normalised_name_is_exactly_allowed(prober, sandbox, upstream):
    checks = [{"name": k, "op": "tls_hello", "host": "127.0.0.1", "port": 443, "hello_hex": v[0].hex(),
               "chunk": v[1]} for k, v in CASES.items()]
    # the IPv6 listener ([::1]:443) judges the same way
    checks += [{"name": "v6_exact", "op": "tls_hello", "host": "::1", "port": 443,
                "hello_hex": hello([A]).hex()},
               {"name": "v6_unlisted", "op": "tls_hello", "host": "::1", "port": 443,
                "hello_hex": hello([b"evil.example.net"]).hex()}]
    # Barrier: an allowed connection is dialled only after the supervisor ACKed its event,
    # and the proxy's channel is in order, so once it is answered every verdict above has
    # reached the supervisor (events still in flight at exit are judged and recorded too:
    # test_hellos_sent_just_before_exit_still_get_their_verdict).
    checks.append({"name": "barrier", "op": "tls_hello", "host": "127.0.0.1", "port": 443,
                   "hello_hex": hello([A]).hex()})
    res, run = prober.inside(checks, "--allow", ALLOWED, "--upstream",
                             f"{ALLOWED}=127.0.0.1:{upstream.port}", timeout=120)
    events = run.audit()
    by_port: dict[int, list[str]] = {}
    for e in events:
        if e["event"]["action"] in ("connection-allowed", "connection-denied"):
            by_port.setdefault(e["source"]["port"], []).append(e["event"]["action"])
    verdicts = {}
    for name, (_data, _chunk, allowed) in CASES.items():
        r = res[name]
        assert r["ok"], (name, r)  # the probe connected and sent it
        acts = by_port.get(r["local_port"], [])
        verdicts[name] = acts
        if allowed:
            assert acts == ["connection-allowed"], (name, acts, r)
            assert r["alert_desc"] != 49, (name, r)  # not the proxy's access_denied
        else:
            assert acts == ["connection-denied"], (name, acts, r)
    v6 = {k: by_port.get(res[k]["local_port"], []) for k in ("v6_exact", "v6_unlisted")}
    assert v6 == {"v6_exact": ["connection-allowed"], "v6_unlisted": ["connection-denied"]}, v6
    n_allowed = sum(1 for v in CASES.values() if v[2]) + 2  # + v6_exact and the barrier
    assert upstream.accepted == n_allowed, (upstream.accepted, verdicts)
    # a well-formed hello for another name gets a TLS access_denied alert; malformed ones
    # are closed without a word
    for k in ("no_sni", "subdomain", "parent", "punycode_other", "evil_byte_records"):
        assert res[k]["alert_desc"] == 49, (k, res[k])
    assert "session-ended" in run.actions()


class SilentUpstream:
    """A plain TCP 'upstream' that accepts and holds every connection open, ignoring EOF:
    a connection through the proxy to it ends only when the proxy ends it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        for c in [self.sock, *self.conns]:
            c.close()


def test_connections_open_at_exit_still_get_their_closing_summary(prober):
    up = SilentUpstream()
    try:
        checks = [{"name": f"c{i}", "op": "tls_hello", "host": "127.0.0.1", "port": 443,
                   "hello_hex": hello([A]).hex(), "wait": 0} for i in range(3)]
        res, run = prober.inside(checks, "--allow", ALLOWED, "--upstream", f"{ALLOWED}=127.0.0.1:{up.port}")
    finally:
        up.close()
    events = run.audit()
    allowed = {e["source"]["port"] for e in events if e["event"]["action"] == "connection-allowed"}
    closed = {e["source"]["port"] for e in events if e["event"]["action"] == "connection-closed"}
    assert allowed == {r["local_port"] for r in res.values()}  # control: all three went through
    assert closed == allowed, f"{len(allowed - closed)} of {len(allowed)} connections have no summary"


def test_hellos_sent_just_before_exit_still_get_their_verdict(prober):
    """The probe sends each hello and leaves at once, then exits: the proxy may not have
    read them yet when the command ends. Every one must still be judged and recorded."""
    checks = [{"name": f"d{i}", "op": "tls_hello", "host": "127.0.0.1", "port": 443,
               "hello_hex": hello([b"evil.example.net"]).hex(), "wait": 0} for i in range(40)]
    res, run = prober.inside(checks, "--allow", ALLOWED)
    ports = {r["local_port"] for r in res.values()}
    assert len(ports) == 40  # control: every connection was made
    denied = {e["source"]["port"] for e in run.audit() if e["event"]["action"] == "connection-denied"}
    assert ports <= denied, f"{len(ports - denied)} of 40 hellos have no verdict in the audit"

