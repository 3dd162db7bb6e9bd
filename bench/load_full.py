"""Full-mode load run (issue 7): the figures in docs/security.md "Load and faults".

    # as an unprivileged user, from the repository root:
    /opt/apvenv/bin/python bench/load_full.py            # 1,000 held, 5,000 churn, 200 slow
    /opt/apvenv/bin/python bench/load_full.py --quick    # CI-sized (what test_load.py runs)
    /opt/apvenv/bin/python bench/load_full.py --json out.json

Each scenario is one real agentpen session (bwrap, pasta, nft, the proxy worker) whose
command is tests/adversarial/loadclient.py running inside the sandbox; the upstream is
a local asyncio TLS server pinned with --upstream. The proxy's RSS and descriptor
count are read from the host (/proc/<pid>/status), its pid from the audit stream.
Prints one table (markdown) and, with --json, the raw results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "adversarial"))

from loadkit import AsyncTlsUpstream, ScenarioRun, actions, stderr_problems  # noqa: E402

AGENTPEN = [sys.executable, "-m", "agentpen.supervisor"]


class Home:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.project = self.home / "src" / "project"
        self.project.mkdir(parents=True)

    def popen(self, *args: str, audit: Path, **kw) -> subprocess.Popen:
        env = {"HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "LANG": "C.UTF-8", "XDG_STATE_HOME": str(self.root / "state")}
        argv = [*AGENTPEN, "--log-format", "json", "--audit-log", str(audit), *args]
        return subprocess.Popen(argv, cwd=self.project, env=env, **kw)


def scenario(tmp: Path, up, name: str, hold: bool = False, **kw) -> dict:
    h = Home(tmp / name)
    audit = h.root / "audit.jsonl"
    run = ScenarioRun(h.popen, h.project, audit, up, name, **kw)
    run.sample("start")
    if hold:
        run.wait_held(300)
        run.sample("held")
        run.go()
    rc, res, err, events = run.finish(600)
    acts = actions(events)
    count = {a: acts.count(a) for a in ("connection-allowed", "connection-denied", "connection-closed",
                                        "worker-restarted", "worker-exited")}
    left = run.leftovers()
    return {"scenario": name, "rc": rc, "seconds": round(run.seconds, 2), "client": res,
            "proxy_rss_kib": run.rss, "proxy_fds": run.fds,
            "upstream": {"handshakes": up.handshakes, "served": up.served, "peak_open": up.peak},
            "audit_lines": len(events), "audit_counts": count, "stderr_problems": stderr_problems(err),
            "leftovers": left}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args()
    if os.geteuid() == 0:
        sys.exit("run as an unprivileged user (pasta refuses root)")
    hold_n, churn_n, slow_n = (300, 300, 15) if a.quick else (1000, 5000, 200)
    results = []
    with tempfile.TemporaryDirectory(prefix="agentpen-load-") as d:
        tmp = Path(d)
        plan = [
            ("hold", {"hold": True, "n": hold_n, "open_concurrency": 100}),
            ("churn", {"n": churn_n, "concurrency": 100}),
            ("slow", {"slow": slow_n, "silent": slow_n, "probes": 10, "interval": 0.5, "give_up": 30,
                      "barrier": True}),
            ("huge", {"size": 1_000_000}),
        ]
        for name, kw in plan:
            (tmp / f"up-{name}").mkdir()
            up = AsyncTlsUpstream(tmp / f"up-{name}")
            try:
                t0 = time.monotonic()
                r = scenario(tmp, up, name, **kw)
                r["wall_s"] = round(time.monotonic() - t0, 2)
            finally:
                up.close()
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    bad = [r["scenario"] for r in results if r["rc"] != 0 or r["leftovers"] or r["stderr_problems"]]
    return 1 if bad else 0


def table(results: list[dict]) -> str:
    rows = ["| scenario | offered | served | refused | errors | denied (audited) "
            "| proxy RSS start -> peak (KiB) | proxy fds | responsive probe | audit lines | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["client"]
        errs = c.get("errors", {})
        refused = errs.get("refused", 0)
        other = sum(v for k, v in errs.items() if k != "refused")
        rss = r["proxy_rss_kib"]
        rss_s = f"{rss.get('start')} -> {rss.get('peak')}"
        fds = r["proxy_fds"].get("held", r["proxy_fds"].get("start"))
        if r["scenario"] == "hold":
            offered, served = c.get("n"), c.get("served")
            probe = f"{c.get('probe_ok')} ({c.get('probe_s')} s)"
        elif r["scenario"] == "churn":
            offered, served = c.get("n"), c.get("served")
            probe = f"{c.get('per_s')}/s, p99 {c.get('p99_s')} s"
        elif r["scenario"] == "slow":
            offered = f"{c.get('slow')} slow + {c.get('silent')} silent"
            served = f"{c.get('closed')} cut at {c.get('closed_min_s')}-{c.get('closed_max_s')} s"
            probe = f"{c.get('probes_ok')}/{c.get('probes')} (max {c.get('probe_max_s')} s)"
        else:
            offered, served = f"1 hello of {c.get('wire_bytes')} B", c.get("outcome")
            probe = f"{c.get('probe_ok')} ({c.get('probe_s')} s)"
        denied = r["audit_counts"]["connection-denied"]
        rows.append(f"| {r['scenario']} | {offered} | {served} | {refused} | {other} | {denied} "
                    f"| {rss_s} | {fds} | {probe} | {r['audit_lines']} | {r['wall_s']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
