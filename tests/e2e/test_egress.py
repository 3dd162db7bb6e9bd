"""Issues 2, 4, 5: the one door. Through the real path: sandbox DNS -> 127.0.0.1:443 in the
sandbox netns -> proxy worker on the host -> pinned local TLS upstream."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(autouse=True)
def _curl():
    if not shutil.which("curl"):
        pytest.fail("curl is needed for the egress tests (apt-get install curl)")


def _pin(upstream):
    return ["--allow", upstream.name, "--upstream", f"{upstream.name}=127.0.0.1:{upstream.port}"]


def _curl_cmd(upstream, url: str, extra: str = "") -> list[str]:
    cert = upstream.cert
    return ["--", "sh", "-c", f"curl -sS --max-time 10 --cacert {cert} {extra} {url}; echo rc=$?"]


def test_allowed_name_reaches_its_upstream_through_the_proxy(sandbox, upstream):
    r = sandbox.run(*_pin(upstream), "--mount", str(upstream.cert),
                    *_curl_cmd(upstream, f"https://{upstream.name}/"))
    assert "hello from upstream" in r.stdout, (r.stdout, r.stderr)
    assert upstream.snis == [upstream.name]
    events = r.audit()
    allowed = [e for e in events if e["event"]["action"] == "connection-allowed"]
    closed = [e for e in events if e["event"]["action"] == "connection-closed"]
    assert allowed and allowed[0]["tls"]["client"]["server_name"] == upstream.name
    assert closed and closed[0]["destination"]["bytes"] > 0 and closed[0]["source"]["bytes"] > 0
    assert allowed[0]["event"]["sequence"] < closed[0]["event"]["sequence"]


def test_unlisted_name_does_not_resolve_and_fails_fast(sandbox, upstream):
    r = sandbox.run(*_pin(upstream), "--mount", str(upstream.cert),
                    *_curl_cmd(upstream, "https://evil.example.net/"))
    assert "rc=6" in r.stdout, r.stdout  # curl: could not resolve host
    assert upstream.accepted == 0


def test_unlisted_sni_is_denied_before_any_byte_reaches_the_upstream(sandbox, upstream):
    # Positive control in the same session: the allowed name works through the same path.
    r = sandbox.run(
        *_pin(upstream), "--mount", str(upstream.cert), "--", "sh", "-c",
        f"curl -sS --max-time 10 --cacert {upstream.cert} https://{upstream.name}/; "
        f"curl -sS --max-time 10 -k --resolve evil.example.net:443:127.0.0.1 "
        f"https://evil.example.net/; echo rc=$?",
    )
    assert "hello from upstream" in r.stdout
    assert "rc=0" not in r.stdout.splitlines()[-1]
    assert upstream.snis == [upstream.name]  # the evil hello never reached it
    denied = [e for e in r.audit() if e["event"]["action"] == "connection-denied"]
    assert denied, [e["event"]["action"] for e in r.audit()]
    d = denied[0]
    assert d["event"]["type"] == ["connection", "denied"] and d["event"]["outcome"] == "success"
    assert d["tls"]["client"]["server_name"] == "evil.example.net"


def test_no_sni_is_denied(sandbox, upstream):
    r = sandbox.run(*_pin(upstream), "--", "sh", "-c",
                    "curl -sS --max-time 10 -k https://127.0.0.1/; echo rc=$?")
    assert "rc=0" not in r.stdout
    assert upstream.accepted == 0
    assert any(e["event"]["action"] == "connection-denied" for e in r.audit())


def test_nothing_but_the_proxy_port_is_reachable_inside(sandbox, upstream):
    # The host's upstream port is not reachable directly from the sandbox (no route, no
    # pasta forwarding); positive control: the proxy port on the sandbox's loopback is.
    script = (
        f"curl -sS --max-time 5 -k https://127.0.0.1:{upstream.port}/ >/dev/null 2>&1; echo direct=$?; "
        "curl -sS --max-time 5 -k https://127.0.0.1:443/ >/dev/null 2>&1; echo proxy=$?"
    )
    r = sandbox.run(*_pin(upstream), "--", "sh", "-c", script)
    assert "direct=7" in r.stdout, r.stdout  # connection refused: nothing listens there
    assert "proxy=7" not in r.stdout, r.stdout  # the proxy accepted (then denied: no SNI)
