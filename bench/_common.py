"""Helpers shared by the benchmarks: statistics, /proc readers, the agentpen command line.

Benchmarks that start agentpen must run as an unprivileged user (pasta refuses root):
    su aptest -c '/opt/apvenv/bin/python bench/run_all.py'
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

CLK = os.sysconf("SC_CLK_TCK")
AGENTPEN = [sys.executable, "-m", "agentpen.supervisor"]


def pct(xs: Iterable[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(p * len(s)))]


def med(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def cpu_s(pid: int) -> float:
    """CPU time of one process (all its threads), in seconds, with nanosecond
    resolution from /proc/PID/task/*/schedstat (utime+stime tick in 10 ms); threads
    that already exited are only in /proc/PID/stat, so take the larger of the two."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = (int(fields[11]) + int(fields[12])) / CLK
    ns = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return ticks
    return ns / 1e9 if ns / 1e9 > ticks - 0.02 else ticks


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [x.decode(errors="replace") for x in f.read().split(b"\0") if x]
    except OSError:
        return []


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children(p):
            out.append(c)
            todo.append(c)
    return out


def audit_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ts(event: dict) -> float:
    """An audit event's @timestamp as a Unix time."""
    return datetime.fromisoformat(event["@timestamp"].replace("Z", "+00:00")).timestamp()


def wait_for(pred, timeout: float = 10.0, step: float = 0.005):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            v = pred()
            if v:
                return v
        time.sleep(step)
    raise TimeoutError("condition not met in time")


def require_unprivileged() -> None:
    if os.geteuid() == 0:
        sys.exit("run the benchmarks as an unprivileged user (pasta refuses root): "
                 "su aptest -c '/opt/apvenv/bin/python bench/run_all.py'")
