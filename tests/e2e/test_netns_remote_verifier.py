"""The supervisor-side pyroute2 verifier (issue 10) checks the sandbox's namespace, not
its own: it receives a NETLINK_ROUTE socket made inside a real pasta namespace and must
report exactly what verify_closed_namespace() reports in there, and fail once a test
opens the namespace (address, link up, default route)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CODE = """
    from agentpen.workers.netns import main as m
    from agentpen.workers.netns.errors import NetnsSetupError
    from agentpen.workers.netns.verify import verify_closed_namespace
    m._load()
    fds = [int(x) for x in sys.argv[2:]]
    def remote(fd):
        v = m.RemoteVerifier(fd)
        v.dump()
        try:
            return v.result()
        except m._Fatal as exc:
            return "failed: " + exc.what
    local = verify_closed_namespace()
    first = remote(fds[0])
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = next(l["index"] for l in ipr.get_links() if l.get_attr("IFLA_IFNAME") != "lo")
        ipr.addr("add", index=idx, address="10.0.2.15", prefixlen=24)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="10.0.2.2", oif=idx)
    second = remote(fds[1])
    report(local=local, first=first, second=second)
"""


HOST = """
import json, sys
sys.path.insert(0, sys.argv[1])
from agentpen.supervisor.workers import _fork_verifier, _verifier_pair
from test_netns_e2e import Probe
pairs = [_verifier_pair(), _verifier_pair()]
assert all(p is not None for p in pairs), "threads running: no fork"
fds = [p[0].fileno() for p in pairs]
probe = Probe(sys.argv[2].replace("sys.argv[2:]", json.dumps([str(fd) for fd in fds])), extra_fds=tuple(fds))
for ours, theirs in pairs:
    _fork_verifier(theirs, cross_check=sys.argv[3] == "cross-check")
    ours.close()
    theirs.close()
try:
    print(json.dumps(probe.read()))
finally:
    probe.finish()
"""


@pytest.mark.parametrize("mode", ["gate", "cross-check"])
def test_remote_verifier_sees_the_sandbox_namespace(mode):
    """As the gate it imports pyroute2 at once; as the cross-check it waits for the
    socket before importing anything. Both answer the same."""
    # In a fresh process: the supervisor forks its verifier only while single-threaded,
    # and earlier tests leave threads in this one.
    out = subprocess.run([sys.executable, "-c", HOST, str(Path(__file__).parent), CODE, mode],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.splitlines()[-1])
    assert res["first"] == res["local"], res
    assert res["first"]["closed"] is True and res["first"]["default_route"] is False
    assert {a["link"] for a in res["first"]["addresses"]} == {"lo"}
    assert isinstance(res["second"], str) and res["second"].startswith("failed:")
    assert "10.0.2.15" in res["second"] and "default route" in res["second"]
