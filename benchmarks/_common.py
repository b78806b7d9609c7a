"""Shared by the benchmark scripts: run one side in a fresh process, time it, read its
peak RSS (printed by benchmarks/_peak.py at exit)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_child(args: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB) and stdout of `python -m MODULE ARGS` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_peak.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT},
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"child failed: {args}")
    rss = int(proc.stdout.rsplit("PEAK_RSS_MIB", 1)[1].split()[0])
    return seconds, rss, proc.stdout
