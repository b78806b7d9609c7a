"""Runs pipeline commands one after another in this process and prints, as the last line
of stdout, a JSON list with each step's peak memory and its summary: how the hostile-corpus
suite measures what a command costs on a hostile file against the same command on clean
input. The peak is the process's high-water mark (VmHWM), reset before each step
(`/proc/self/clear_refs`), so each step has its own figure; `resource.getrusage`'s
ru_maxrss, which never goes down, is reported beside it (and used where the reset is not
available). Usage: python -m tests.faults.hostile_run STEPS.json"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback


def maxrss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return maxrss_mb()


def main(path: str) -> None:
    steps = json.load(open(path))
    results = []
    for step in steps:
        resettable = reset_peak()
        started = time.perf_counter()
        error = None
        summary = {}
        try:
            summary = importlib.import_module(step["module"]).run(step["argv"]) or {}
        except BaseException as e:  # noqa: BLE001 - recorded: the test asserts there was none
            error = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        results.append({
            "name": step["name"], "peak_mb": round(hwm_mb() if resettable else maxrss_mb(), 1), "maxrss_mb": round(maxrss_mb(), 1),
            "seconds": round(time.perf_counter() - started, 1),
            "error": error, "count_check": summary.get("count_check") if isinstance(summary, dict) else None,
        })
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
