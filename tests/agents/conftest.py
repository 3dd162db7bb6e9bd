"""tests/agents: make agentlib importable and print, at the end of the run, the hosts each
real agent tried that are not in its registry entry (issue 8)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pytest_terminal_summary(terminalreporter):
    mod = sys.modules.get("test_agents")
    extra = getattr(mod, "EXTRA_HOSTS", None)
    if not extra:
        return
    tr = terminalreporter
    tr.section("hosts the agents tried outside their registry entry")
    for name, hosts in sorted(extra.items()):
        tr.write_line(f"{name:9} allowed: {', '.join(hosts['allowed']) or '-'}")
        tr.write_line(f"{'':9} denied (SNI): {', '.join(hosts['denied']) or '-'}; "
                      f"dns-refused: {', '.join(hosts['dns-refused']) or '-'}")
