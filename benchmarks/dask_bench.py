"""The same select_candidates job on three runners: the DirectRunner (one process), Beam's
multi-process runner (2 SDK processes) and a Dask cluster of 2 single-threaded workers on
127.0.0.1 (`--runner DaskRunner`), on the same entity index and captions.

    python benchmarks/dask_bench.py [--captions 20000] [--entities 20000] [--work /tmp/dask_bench]

Each run is the whole command in a fresh process (imports, model load, Parquet read and
write, manifest), so the ratios include each runner's start-up. The Dask workers are
started before the timing (as a cluster is, once, for many jobs); the launcher's peak RSS
is shown, not the workers'. Every run's candidates are checked equal to the DirectRunner's.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks._common import run_child  # noqa: E402
from benchmarks.scaling_bench import write_captions, write_catalog  # noqa: E402


def start_cluster(work: str, workers: int) -> tuple[list, str]:
    """`dask scheduler` and `workers` single-threaded `dask worker` processes on 127.0.0.1."""
    from dask.distributed import Client

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    file = os.path.join(work, "scheduler.json")
    if os.path.exists(file):
        os.remove(file)
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", file,
                               "--no-dashboard"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    deadline = time.time() + 60
    while not os.path.exists(file) and time.time() < deadline:
        time.sleep(0.2)
    for i in range(workers):
        procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", file, "--nthreads", "1", "--host", "127.0.0.1",
                                       "--no-dashboard", "--local-directory", os.path.join(work, f"w{i}")],
                                      env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
    with Client(scheduler_file=file, timeout=60) as c:
        c.wait_for_workers(workers, timeout=120)
    return procs, file


def stop_cluster(procs: list) -> None:
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def pairs(out: str) -> list:
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(out, "candidates-*.parquet")))
    return sorted((r["key"], r["qid"]) for r in pq.read_table(files, columns=["key", "qid"]).to_pylist())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=20000)
    ap.add_argument("--entities", type=int, default=20000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/dask_bench")
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    catalog = os.path.join(args.work, f"catalog_{args.entities}.jsonl")
    names = write_catalog(catalog, args.entities)
    captions = os.path.join(args.work, f"captions_{args.captions}.parquet")
    write_captions(captions, args.captions, names)
    index = os.path.join(args.work, f"index_{args.entities}")
    if not os.path.exists(os.path.join(index, "manifest.json")):
        run_child(["-m", "pipelines.build_entity_index", "--entities", catalog, "--output", index])

    def job(out: str, *extra: str) -> list[str]:
        return ["-m", "pipelines.select_candidates", "--entity_index", index, "--captions", captions, "--k", str(args.k),
                "--output", out, "--progress_interval", "0", *extra]

    procs, scheduler = start_cluster(args.work, args.workers)
    try:
        runs = [
            ("DirectRunner (1 process)", []),
            (f"DirectRunner multi_processing ({args.workers} processes)",
             ["--direct_running_mode", "multi_processing", "--direct_num_workers", str(args.workers)]),
            (f"DaskRunner ({args.workers} workers x 1 thread)", ["--runner", "DaskRunner", "--dask_scheduler_file", scheduler]),
        ]
        results = []
        for i, (name, extra) in enumerate(runs):
            out = os.path.join(args.work, f"out_{i}")
            seconds, rss, _ = run_child(job(out, *extra))
            results.append((name, seconds, rss, pairs(out)))
    finally:
        stop_cluster(procs)
    base = results[0]
    print(f"select_candidates: {args.captions:,} captions, {args.entities:,} entities, K={args.k}, 2 cores")
    print(f"{'runner':<48}{'seconds':>9}{'launcher MiB':>14}{'ratio':>8}  candidates")
    for name, seconds, rss, got in results:
        same = "same" if got == base[3] else f"DIFFER ({len(got)} vs {len(base[3])})"
        print(f"{name:<48}{seconds:>9.1f}{rss:>14}{base[1] / seconds:>8.2f}  {len(got):,} {same}")
    dask = results[-1]
    print(f"ratio DaskRunner / DirectRunner throughput {base[1] / dask[1]:.2f}")


if __name__ == "__main__":
    main()
