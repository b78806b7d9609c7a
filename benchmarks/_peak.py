"""Run a module like `python -m`, then print this process's peak RSS (for the benchmarks)."""

import atexit
import resource
import runpy
import sys


def _report():
    print(f"PEAK_RSS_MIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}", flush=True)


if __name__ == "__main__":
    assert sys.argv[1] == "-m", "usage: _peak.py -m MODULE ARGS..."
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    atexit.register(_report)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
