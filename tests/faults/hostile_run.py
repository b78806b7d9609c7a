"""Runs pipeline commands one after another in this process and prints, as the last line
of stdout, a JSON list with each step's peak memory (`resource.getrusage` ru_maxrss of
this process and its children, MB, monotonic) and its summary: how the hostile-corpus
suite measures what a command costs on a hostile file against the same command on clean
input. Usage: python -m tests.faults.hostile_run STEPS.json"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback


def peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def main(path: str) -> None:
    steps = json.load(open(path))
    results = []
    for step in steps:
        started = time.perf_counter()
        error = None
        summary = {}
        try:
            summary = importlib.import_module(step["module"]).run(step["argv"]) or {}
        except BaseException as e:  # noqa: BLE001 - recorded: the test asserts there was none
            error = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        results.append({
            "name": step["name"], "peak_mb": round(peak_mb(), 1), "seconds": round(time.perf_counter() - started, 1),
            "error": error, "count_check": summary.get("count_check") if isinstance(summary, dict) else None,
        })
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
