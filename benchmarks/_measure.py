"""Wall time and peak memory of a command and all the processes it starts (Linux /proc), for benchmarks."""

from __future__ import annotations

import os
import subprocess
import time

__all__ = ["tree_rss_bytes", "run_measured"]


def tree_rss_bytes(pid: int) -> int:
    """Sum of resident memory of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def run_measured(cmd: list[str], env: dict | None = None, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL) -> tuple[float, int, int]:
    """Run ``cmd`` (stdout to ``stdout``, stderr to ``stderr``); return wall seconds, peak tree RSS (bytes,
    sampled every 50 ms) and the exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.05)
    return time.perf_counter() - t0, peak, proc.returncode
