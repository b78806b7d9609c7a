"""Peak memory of the single-worker and per-process steps at catalog scale, before and after
the web-scale changes, on a synthetic catalog.

    .venv/bin/python benchmarks/memory_bench.py --entities 1000000 --before 22f7ca3

The catalog: N synthetic entities with Wiki6M-shaped rows (titles of 1-5 words from a
50k-word vocabulary, a ~300-character summary, an `extra_json` field) and random unit
vectors of 384 dims in the vector parts that build_entity_index's embedding step writes
(4,096 entities a part). The vectors are synthetic because the encoder is not what these
steps hold: embedding 1M titles with all-MiniLM-L6-v2 takes ~15 min on 2 cores and changes
no figure below. Measured, each in a fresh process (peak RSS = VmHWM):

  finalize        the index finalisation (ids, entities.parquet, embeddings.npy, flat index)
  grounding       the grounding title tables of one SDK process (Grounder, no encoder / index)
  grounding x 4   4 SDK processes on one machine: the sum of their RSS (after: the first
                  process holds the tables and serves the others through Beam's
                  MultiProcessShared, as RunInference does for a shared model)

`--before REF` runs the same measurements on the code of a git ref (default: the commit
before this round's changes) for the "before" column.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIM = 384
PART = 4096


def write_parts(folder: str, n: int, seed: int = 0) -> list[str]:
    """Vector parts as WriteVectorPart writes them (Entity columns + a fixed-size vector)."""
    sys.path.insert(0, ROOT)
    from transforms.stages.build_entity_index import _part_schema

    rng = np.random.default_rng(seed)
    words = np.array([f"w{i:05d}" for i in range(50_000)])
    os.makedirs(folder, exist_ok=True)
    paths = []
    order = rng.permutation(n)  # parts hold entities in shuffled order, as after the GroupByKey
    for start in range(0, n, PART):
        rows = order[start : start + PART]
        m = len(rows)
        lengths = rng.integers(1, 6, m)
        titles = [" ".join(words[rng.integers(0, len(words), k)]).title() for k in lengths]
        vec = rng.standard_normal((m, DIM)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        table = pa.table(
            {
                "qid": [f"Q{r + 1}" for r in rows],
                "title": titles,
                "int_id": pa.array(np.full(m, -1), pa.int64()),
                "summary": [f"{t} is a synthetic entity. " * 10 for t in titles],
                "file_index": pa.array(np.zeros(m), pa.int32()),
                "row": pa.array(rows, pa.int64()),
                "extra_json": [json.dumps({"wikipedia_image_url": f"https://x/{r}.jpg"}) for r in rows],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), DIM),
            },
            schema=_part_schema(DIM),
        )
        path = os.path.join(folder, f"part-{start // PART:06d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths


CHILD = {
    "finalize": """
        import json, sys
        import os
        # The layout of the code being measured (its folder is the working directory): an
        # import that fails is not enough, the installed checkout would answer it.
        if os.path.isdir("transforms/stages"):
            from transforms.stages.build_entity_index import finalize_entity_index
        else:  # --before code from before transforms/ was grouped by role
            from transforms.entity_index import finalize_entity_index
        parts, out = json.loads(sys.argv[1]), sys.argv[2]
        finalize_entity_index(parts, out, factory="Flat", train_sample=0, seed=0, model_name="synthetic", inputs=[])
    """,
    "grounding": """
        import sys
        import pyarrow.parquet as pq
        import os
        if os.path.isdir("transforms/stages"):
            from transforms.stages import ground as grounding
        else:  # --before code from before transforms/ was grouped by role
            from transforms import grounding
        table = pq.read_table(sys.argv[2] + "/entities.parquet", columns=["int_id", "qid", "title"])
        if hasattr(grounding.Grounder, "from_table"):
            g = grounding.Grounder.from_table(table)
        else:
            g = grounding.Grounder(list(zip(table["int_id"].to_pylist(), table["qid"].to_pylist(), table["title"].to_pylist())))
        del table
        g.ground_text("W00001 W00002")
    """,
}

REPORT = """
import atexit
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("PEAK_RSS_MIB", int(line.split()[1]) // 1024, flush=True)
atexit.register(_hwm)
"""


def run_child(code_root: str, kind: str, *args: str) -> tuple[int, float]:
    script = REPORT + textwrap.dedent(CHILD[kind])
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=code_root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": code_root},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed in {code_root}:\n{proc.stderr[-3000:]}")
    return int(proc.stdout.rsplit("PEAK_RSS_MIB", 1)[1].split()[0]), time.perf_counter() - t0


def machine_grounding(code_root: str, index_dir: str, processes: int, shared: bool) -> int:
    """Sum of the RSS (MiB) of `processes` SDK-like processes that each ground names, plus
    the shared server when `shared`: what one machine holds."""
    import hashlib

    tag = "bench-grounder-" + hashlib.sha1(index_dir.encode()).hexdigest()[:12]
    script = textwrap.dedent(
        f"""
        import os, sys, time
        import pyarrow.parquet as pq
        import os
        if os.path.isdir("transforms/stages"):
            from transforms.stages import ground as grounding
        else:  # --before code from before transforms/ was grouped by role
            from transforms import grounding

        def load():
            table = pq.read_table({index_dir!r} + "/entities.parquet", columns=["int_id", "qid", "title"])
            if hasattr(grounding.Grounder, "from_table"):
                return grounding.Grounder.from_table(table)
            return grounding.Grounder(list(zip(table["int_id"].to_pylist(), table["qid"].to_pylist(), table["title"].to_pylist())))

        if {shared!r}:
            from apache_beam.utils.multi_process_shared import MultiProcessShared
            g = MultiProcessShared(load, tag={tag!r}, always_proxy=True).acquire()
        else:
            g = load()
        g.ground_text("W00001 W00002")
        print("READY", os.getpid(), flush=True)
        time.sleep(600)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=code_root, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": code_root})
        for _ in range(processes)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()
            assert line.startswith("READY"), line
        time.sleep(1)
        pids = set()
        for p in procs:
            pids |= _tree(p.pid)
        return sum(_rss_mib(pid) for pid in pids)
    finally:
        for p in procs:
            p.kill()


def _tree(pid: int) -> set[int]:
    out = {pid}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out |= _tree(int(d))
    return out


def _rss_mib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def checkout(ref: str, folder: str) -> str:
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", folder, ref], check=True, capture_output=True)
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=1_000_000)
    ap.add_argument("--before", default="e3f142a", help="git ref of the 'before' code (empty: skip)")
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="memory-bench-")
    try:
        t0 = time.perf_counter()
        parts = write_parts(os.path.join(work, "parts"), args.entities)
        print(f"{args.entities:,} entities in {len(parts)} parts ({time.perf_counter() - t0:.0f} s); CPU: {_cpu()}")
        sides = {"after": ROOT}
        if args.before:
            sides["before"] = checkout(args.before, os.path.join(work, "before"))
        results = {}
        for side, code_root in sides.items():
            out = os.path.join(work, f"index-{side}")
            # finalize deletes its parts: give each side its own copy
            copies = []
            for p in parts:
                dst = os.path.join(work, f"parts-{side}", os.path.basename(p))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy(p, dst)
                copies.append(dst)
            fin, fin_s = run_child(code_root, "finalize", json.dumps(copies), out)
            grd, grd_s = run_child(code_root, "grounding", "", out)
            machine = machine_grounding(code_root, out, args.processes, shared=(side == "after"))
            results[side] = {"finalize": fin, "finalize_s": fin_s, "grounding": grd, "grounding_s": grd_s, "machine": machine}
            print(side, results[side], flush=True)
        print()
        print(f"peak RSS (MiB), {args.entities:,} entities x {DIM} dims, flat index")
        print(f"{'step':<44} {'before':>8} {'after':>8}")
        rows = [
            ("index finalisation (one worker)", "finalize"),
            ("grounding tables, one SDK process", "grounding"),
            (f"grounding tables, machine with {args.processes} SDK processes", "machine"),
        ]
        for label, key in rows:
            before = results.get("before", {}).get(key, "")
            print(f"{label:<44} {before!s:>8} {results['after'][key]:>8}")
    finally:
        if args.before:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", os.path.join(work, "before")], capture_output=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
