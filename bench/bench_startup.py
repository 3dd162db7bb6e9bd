"""Start-up: wall time of `agentpen -- true` against the floor its mechanisms impose,
measured interleaved in the same run, plus where the time goes and peak RSS per process.

    su aptest -c 'cd SOMEDIR && /opt/apvenv/bin/python /work/main/bench/bench_startup.py [--runs N] [--json]'

Floor: `pasta -q -f -t none -u none -T none -U none -- bwrap <the jail's argv> true`,
where the argv is the one the jail worker execs (workers/jail/bwrap.build_bwrap_argv,
same policy, layout, covers, seccomp program and staged /etc files, on real fds).
agentpen: `python -m agentpen.supervisor --audit-log FILE -- true` (the file sink is
the default kind of sink). Runs alternate floor / agentpen so that noise hits both.
Phases come from the audit stream's timestamps (wall clock), against the launch time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    AGENTPEN,
    audit_events,
    cmdline,
    comm,
    descendants,
    med,
    pct,
    require_unprivileged,
    status_kib,
    ts,
)

PASTA_FLOOR = ["pasta", "-q", "-f", "-t", "none", "-u", "none", "-T", "none", "-U", "none", "--"]


class Floor:
    """The jail's own bwrap argv on real descriptors, run under a bare pasta."""

    def __init__(self, project: Path, allow: list[str]) -> None:
        from agentpen.supervisor import options
        from agentpen.supervisor.resolve import resolve_policy
        from agentpen.workers.jail import bwrap, seccomp
        from agentpen.workers.jail.launch import jail_covers, open_data_fd
        from agentpen.workers.jail.layout import detect_layout

        cwd = os.getcwd()
        os.chdir(project)
        try:
            opts = options.parse_args([*(f"--allow={a}" for a in allow), "--", "true"])
            self.policy = resolve_policy(opts, os.environ)
        finally:
            os.chdir(cwd)
        layout = detect_layout()
        covers = jail_covers(self.policy)
        self.status_r, status_w = os.pipe()
        os.set_blocking(self.status_r, False)
        fds = bwrap.JailFds(
            seccomp=open_data_fd("seccomp", seccomp.build_seccomp_program()),
            json_status=status_w,
            hosts=open_data_fd("hosts", bwrap.hosts_file().encode()),
            resolv=open_data_fd("resolv", bwrap.resolv_conf().encode()),
            nsswitch=open_data_fd("nsswitch", bwrap.nsswitch_conf(layout.nsswitch).encode()),
            empty=tuple(open_data_fd("placeholder", c.data) for c in covers if c.kind == "file"),
        )
        self.fds = [fds.seccomp, fds.json_status, fds.hosts, fds.resolv, fds.nsswitch, *fds.empty]
        self.argv = PASTA_FLOOR + bwrap.build_bwrap_argv(self.policy, layout, fds, covers)
        self.env = dict(self.policy.env)
        self.cwd = str(project)

    def run(self) -> float:
        # The seccomp and data memfds are read by bwrap from offset 0 each time.
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.lseek(fd, 0, os.SEEK_SET)
        t0 = time.perf_counter()
        subprocess.run(self.argv, pass_fds=self.fds, env=self.env, cwd=self.cwd, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        with contextlib.suppress(BlockingIOError):
            while os.read(self.status_r, 65536):
                pass
        return dt


def agentpen_argv(audit: Path, allow: list[str], command: list[str],
                  python: str | None = None) -> list[str]:
    head = [python, "-m", "agentpen.supervisor"] if python else AGENTPEN
    return [*head, "--log-format", "json", "--log-level", "warning", "--audit-log", str(audit),
            *(f"--allow={a}" for a in allow), "--", *command]


def run_agentpen(project: Path, tmp: Path, allow: list[str], i: int,
                 python: str | None = None) -> tuple[float, dict[str, float]]:
    audit = tmp / f"audit-{i}.jsonl"
    t_wall = time.time()
    t0 = time.perf_counter()
    subprocess.run(agentpen_argv(audit, allow, ["true"], python), cwd=project, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    phases: dict[str, float] = {}
    for e in audit_events(audit):
        action = e["event"]["action"]
        extra = e.get("agentpen", {}).get("step") or e.get("agentpen", {}).get("role")
        key = f"{action}:{extra}" if extra else action
        phases.setdefault(key, (ts(e) - t_wall) * 1000)
    audit.unlink()
    return dt, phases


ROLES = {  # comm -> role: the names the workers give themselves (prctl PR_SET_NAME)
    "agentpen-proxy": "proxy worker", "agentpen-netns": "netns worker",
    "agentpen-nsjoin": "nsjoin (waits for the netns worker)", "agentpen-verify": "pyroute2 verifier",
    "agentpen-guard": "guardian", "bwrap": "bwrap (jail)",
}


def peak_rss(project: Path, tmp: Path) -> dict[str, float]:
    """VmHWM (MiB) of each process of a session, read while `sleep` runs in it (after the
    proxy's and the cross-check's start, 0.25 s after the jail's)."""
    audit = tmp / "audit-rss.jsonl"
    p = subprocess.Popen(agentpen_argv(audit, [], ["sleep", "1.5"]), cwd=project,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, float] = {}
    try:
        time.sleep(1.0)
        out["supervisor"] = status_kib(p.pid, "VmHWM") / 1024
        for pid in descendants(p.pid):
            name, argv = comm(pid), cmdline(pid)
            if "agentpen.workers.netns" in argv:
                role = "netns worker"  # started by pasta (the fallback)
            elif name.startswith("passt") or name == "pasta":
                role = "pasta"
            elif "agentpen-netns-holder" in argv:
                role = "pasta's holder (sh)"
            else:
                role = ROLES.get(name)
            if role is None:
                continue
            with contextlib.suppress(OSError, KeyError):
                out[role] = max(out.get(role, 0.0), status_kib(pid, "VmHWM") / 1024)
    finally:
        p.wait(10)
        audit.unlink(missing_ok=True)
    return out


def measure(runs: int, allow: list[str] | None = None, rss: bool = True,
            baseline: str | None = None, python: str | None = None) -> dict:
    """`baseline`: the python of another agentpen install (e.g. the code before an
    optimisation), run interleaved as a third variant."""
    allow = allow or []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as d:
        tmp = Path(d)
        project = tmp / "project"
        project.mkdir()
        floor = Floor(project, allow)
        floor.run()  # warm caches (page cache, pasta --help cache is per process anyway)
        run_agentpen(project, tmp, allow, -1, python)
        f_times, a_times, b_times, phases, b_phases = [], [], [], [], []
        if baseline:
            run_agentpen(project, tmp, allow, -2, baseline)
        for i in range(runs):
            f_times.append(floor.run())
            # With a baseline, the two alternate in second and third place: the run right
            # after the floor's meets the kernel still tearing its namespaces down.
            order = [(python, a_times, phases), (baseline, b_times, b_phases)]
            for which, times, phs in (order if i % 2 == 0 else order[::-1]):
                if which is None and times is b_times:
                    continue  # no baseline
                dt, ph = run_agentpen(project, tmp, allow, i, which)
                times.append(dt)
                phs.append(ph)
        res = {
            "runs": runs,
            "allowlist": len(allow),
            "floor_ms_p50": med(f_times) * 1000,
            "floor_ms_min": min(f_times) * 1000,
            "agentpen_ms_p50": med(a_times) * 1000,
            "agentpen_ms_min": min(a_times) * 1000,
            "agentpen_ms_p90": pct(a_times, 0.9) * 1000,
            "ratio_p50": med(a_times) / med(f_times),
            "ratio_min": min(a_times) / min(f_times),
        }
        res["phases_ms_p50"] = _phases(phases)
        if baseline:
            res.update({
                "baseline_python": baseline,
                "baseline_ms_p50": med(b_times) * 1000,
                "baseline_ms_min": min(b_times) * 1000,
                "baseline_ratio_p50": med(b_times) / med(f_times),
                "baseline_phases_ms_p50": _phases(b_phases),
            })
        if rss:
            res["peak_rss_MiB"] = {k: round(v, 1) for k, v in peak_rss(project, tmp).items()}
    return res


def _phases(phases: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for ph in phases for k in ph}, key=lambda k: med(ph[k] for ph in phases if k in ph))
    return {k: round(med(ph[k] for ph in phases if k in ph), 1) for k in keys}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--baseline", metavar="PYTHON",
                    help="python of another agentpen install, run interleaved (before/after)")
    ap.add_argument("--python", metavar="PYTHON",
                    help="python of the agentpen install under test (default: this one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    require_unprivileged()
    res = measure(args.runs, baseline=args.baseline, python=args.python)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"start-up, {args.runs} runs interleaved")
    for k in ("floor_ms_p50", "floor_ms_min", "agentpen_ms_p50", "agentpen_ms_min", "agentpen_ms_p90",
              "ratio_p50", "ratio_min", "baseline_ms_p50", "baseline_ms_min", "baseline_ratio_p50"):
        if k in res:
            print(f"  {k:<22} {res[k]:10.2f}")
    for name in ("phases_ms_p50", "baseline_phases_ms_p50"):
        if name in res:
            print(f"  {name} (ms after launch):")
            for k, v in res[name].items():
                print(f"    {k:<44} {v:8.1f}")
    print("  peak RSS (MiB):", res.get("peak_rss_MiB"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
