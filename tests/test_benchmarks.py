"""Benchmarks that cannot rot (issue 23, item 7): every script under benchmarks/ runs here
at a tiny size, as a user runs it (`python benchmarks/X.py ...` in a fresh process from the
repository root, offline), and must exit 0 and print its result line with a number.

The result line is the script's ratio where it measures one in the same run (ours vs the
bare library, vs the ideal rate, or draft vs full decode). compare_models, index_bench,
ivf_recall_bench, memory_bench and scaling_bench print a table and no ratio: for those a row
of the table is checked. At these sizes the figures mean nothing (a steady-state difference
can even be negative); what is tested is that each script still runs against today's code.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"-?\d[\d,]*(?:\.\d+)?"
TIMEOUT_S = 300  # each script takes 10-70 s on 2 cores; this is for a loaded machine
# memory_bench's default `--before` ref: a shallow clone does not have it.
MEMORY_BEFORE_REF = "e3f142a"


def _has_commit(ref: str) -> bool:
    return subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{ref}^{{commit}}"], capture_output=True).returncode == 0


def run_script(script: str, args: list[str]) -> tuple[str, float]:
    """(stdout + stderr, seconds) of `python benchmarks/SCRIPT ARGS`; fails on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "NO_GCE_CHECK": "true", "MPLBACKEND": "Agg"}
    started = time.perf_counter()
    # A session of its own, so that a timeout ends the script's children too (Beam workers,
    # loopback servers, the processes it times).
    proc = subprocess.Popen([sys.executable, os.path.join("benchmarks", script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script} {' '.join(args)} ran past {TIMEOUT_S} s:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}"
    return out, seconds


@pytest.fixture(scope="module")
def tiny_demo(demo_run):
    """A finished demo output (what compare_models reads: the entity index, the REW shards,
    the word-piece vocabulary and the OVEN evaluation files): the session's demo run, which
    the demo and multi-process tests make anyway (compare_models writes into --output only)."""
    out, _ = demo_run
    assert os.path.exists(out / "metrics.json")
    return str(out)


def _memory_args(tmp, request):
    before = [] if _has_commit(MEMORY_BEFORE_REF) else ["--before", ""]  # the default ref, where this clone has it
    return ["--entities", "5000", "--processes", "2", "--work", str(tmp / "work"), *before]


# (script, tiny arguments (a function of the test's tmp_path and request), patterns the output must contain)
CASES = [
    pytest.param(
        "compare_models.py",
        lambda tmp, request: ["--demo", request.getfixturevalue("tiny_demo"), "--steps", "1", "--batch_size", "2",
                              "--output", str(tmp / "compare")],
        # No ratio: one row per model (seen, unseen, HM, train samples/s, ms/image).
        [rf"GIT tiny \+ {s} codes\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}" for s in ("ALD", "HKC", "RQ")]
        + [rf"WikiCLIP-style \(ViT-S-32, MiniLM\)\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}"],
        id="compare_models",
    ),
    pytest.param(
        "dask_bench.py",
        lambda tmp, request: ["--captions", "200", "--entities", "300", "--work", str(tmp / "work")],
        [rf"DaskRunner \(2 workers x 1 thread\)\s+{NUM}\s+\d+\s+{NUM}\s+[\d,]+ same",
         rf"ratio DaskRunner / DirectRunner throughput {NUM}"],
        id="dask_bench",
    ),
    pytest.param(
        "decontaminate_bench.py",
        lambda tmp, request: ["--images", "8", "--eval_images", "2", "--out", str(tmp / "out")],
        [rf"ratio pipeline / bare\s+{NUM}"],
        id="decontaminate_bench",
    ),
    pytest.param(
        "draft_bench.py",
        lambda tmp, request: ["--images", "8", "--pipeline", "2", "--repeats", "1", "--out", str(tmp / "out")],
        [rf"draft decode\s+{NUM} images/s\s+ratio {NUM}", rf"ratio yes / no\s+{NUM}"],
        id="draft_bench",
    ),
    pytest.param(
        "encoder_bench.py",
        lambda tmp, request: ["--captions", "128"],
        [rf"ours: handler defaults \(chunk \d+, \d+ tokens/forward\)\s+{NUM} captions/s\s+ratio {NUM}",
         rf"ours: RunInference on the DirectRunner\s+{NUM} captions/s\s+ratio {NUM}"],
        id="encoder_bench",
    ),
    pytest.param(
        "index_bench.py",
        lambda tmp, request: ["--entities", "2000", "--queries", "100", "--factories", "Flat;IVF16,Flat;IVF16,SQ8;HNSW32",
                              "--cache", str(tmp / "cache")],
        # No ratio: one row per index and knob value (build s, MiB, B/vec, GiB@6M, recall@10, queries/s).
        [rf"(?m)^{re.escape(f)}\s+{k}(?:\s+{NUM}){{6}}$"
         for f, k in (("Flat", "exact"), ("IVF16,Flat", "nprobe=4"), ("IVF16,SQ8", "nprobe=4"), ("HNSW32", "efSearch=64"))],
        id="index_bench",
    ),
    pytest.param(
        "ivf_recall_bench.py",
        lambda tmp, request: ["--entities", "1000", "--nlist", "16"],
        # No ratio: the recall curve (nprobe, recall@10, ms/query) and the chosen nprobe.
        [r"IVF16,Flat: built in \d+ s; chosen nprobe \d+", rf"(?m)^\s+16\s+{NUM}\s+{NUM}$"],
        id="ivf_recall_bench",
    ),
    pytest.param(
        "memory_bench.py",
        _memory_args,
        # No ratio: peak RSS before / after.
        [r"index finalisation \(one worker\)\s+(?:\d+\s+)?\d+", r"grounding tables, machine with 2 SDK processes\s+(?:\d+\s+)?\d+"],
        id="memory_bench",
    ),
    pytest.param(
        "refine_bench.py",
        lambda tmp, request: ["--requests", "16", "--concurrency", "8"],
        [rf"ratio to ideal\s+{NUM}", rf"steady state\s+.*ratio to ideal {NUM}"],
        id="refine_bench-latency",
    ),
    pytest.param(
        "refine_bench.py",
        lambda tmp, request: ["--scenario", "rate_limited", "--requests", "16", "--latency", "0.01", "--concurrency", "4",
                              "--rate_limit", "16"],
        [rf"slow-down controller only\s+answered\s+{NUM}/s = {NUM} of the limit",
         rf"--max_requests_per_minute 960\s+answered\s+{NUM}/s = {NUM} of the limit"],
        id="refine_bench-rate_limited",
    ),
    pytest.param(
        "refine_bench.py",
        lambda tmp, request: ["--scenario", "cache_gcs", "--requests", "16", "--latency", "0.01", "--concurrency", "8"],
        [rf"cache, cold .*ratio to no cache {NUM}", rf"cache, warm .*ratio to no cache {NUM}"],
        id="refine_bench-cache_gcs",
    ),
    pytest.param(
        "scaling_bench.py",
        # Its decontaminate points are left out (--stages): that command line is run by
        # decontaminate_bench and draft_bench here, and a point costs ~20 s.
        lambda tmp, request: ["--out", str(tmp / "out"), "--entities", "1000", "--captions", "100",
                              "--stages", "build_entity_index,select_candidates", "--index_factory", "IVF16,Flat",
                              "--text_backend", "torch", "--plot", str(tmp / "scaling.png")],
        # No ratio: one row per point (seconds, s per 1k, peak RSS, shuffled MiB, kept).
        [rf"(?m)^build_entity_index\s+1,000\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+\d+$",
         rf"(?m)^select_candidates\s+100\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+\d+$",
         r"plot written to "],
        id="scaling_bench",
    ),
    pytest.param(
        "select_bench.py",
        lambda tmp, request: ["--captions", "64", "--out", str(tmp / "out")],
        [rf"ratio pipeline / bare\s+{NUM}"],
        id="select_bench",
    ),
    pytest.param(
        "train_bench.py",
        lambda tmp, request: ["--samples", "16", "--image_px", "64", "--model_config", "tiny", "--steps", "4",
                              "--batch_size", "4", "--log_every", "1"],
        [rf"ratio trainer / bare\s+{NUM}", rf"trainer\.train {NUM} samples/s, ratio {NUM}"],
        id="train_bench",
    ),
]


def test_every_benchmark_script_is_smoke_tested():
    """A script added to benchmarks/ gets a case here (the helpers are not scripts)."""
    helpers = {"__init__.py", "_common.py", "_peak.py", "realtext.py"}
    scripts = {f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py") and f not in helpers}
    assert scripts == {c.values[0] for c in CASES}


# The scripts run two at a time (much of each is single-threaded: imports, model loading,
# the DirectRunner), started for every selected case when the first case asks: the tier's
# wall time, not what a script measures (at these sizes the figures mean nothing).
PARALLEL = 2


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    selected = [item.callspec.id for item in request.session.items
                if item.originalname == "test_benchmark_runs_tiny_and_prints_its_result" and item.module is request.module]
    by_id = {c.id: c.values for c in CASES}
    jobs = {}
    for case_id in selected:
        script, args, _ = by_id[case_id]
        tmp = tmp_path_factory.mktemp(case_id)
        jobs[case_id] = (script, args(tmp, request))
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {cid: pool.submit(_outcome, script, argv) for cid, (script, argv) in jobs.items()}
        return {cid: f.result() for cid, f in futures.items()}


def _outcome(script: str, argv: list[str]):
    try:
        return run_script(script, argv), None
    except BaseException as e:  # noqa: BLE001 - pytest.fail's exception: reported by the case
        return None, e


@pytest.mark.parametrize("script, args, patterns", CASES)
def test_benchmark_runs_tiny_and_prints_its_result(script, args, patterns, smoke_runs, request):
    result, error = smoke_runs[request.node.callspec.id]
    if error is not None:
        raise error
    out, seconds = result
    found = []
    for pattern in patterns:
        m = re.search(pattern, out)
        assert m, f"{script}: no line matching {pattern!r} in its output:\n{out[-6000:]}"
        found.append(" ".join(m.group(0).split()))
    print(f"\n{script} in {seconds:.1f} s: " + " | ".join(found))
