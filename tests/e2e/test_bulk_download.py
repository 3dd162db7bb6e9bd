"""Issue 5's regression: pasta's spliced loopback path held back the last MiBs of a
download until something else happened on the connection. Egress never crosses pasta
now (the proxy accepts on sockets in the sandbox netns): 64 MiB from a server that keeps
the connection open must all arrive, without waiting for the server to close."""

from __future__ import annotations

import pytest
from harness import TlsUpstream

SIZE = 64 * 1024 * 1024


@pytest.fixture
def big_upstream(tmp_path):
    u = TlsUpstream(tmp_path, body=b"x" * SIZE, keep_open=True)
    yield u
    u.close()


def test_64_mib_arrive_from_a_server_that_keeps_the_connection_open(sandbox, big_upstream):
    u = big_upstream
    # curl stops at Content-Length; a stall of the tail would hit --max-time instead.
    r = sandbox.run(
        "--allow", u.name, "--upstream", f"{u.name}=127.0.0.1:{u.port}", "--mount", str(u.cert),
        "--", "sh", "-c",
        f"curl -sS --max-time 60 --cacert {u.cert} -o /dev/null -w 'size=%{{size_download}} "
        f"time=%{{time_total}}\\n' https://{u.name}/big; echo rc=$?",
        timeout=120,
    )
    assert "rc=0" in r.stdout, (r.stdout, r.stderr)
    assert f"size={SIZE}" in r.stdout, r.stdout
    closed = [e for e in r.audit() if e["event"]["action"] == "connection-closed"]
    assert closed and closed[0]["destination"]["bytes"] >= SIZE
