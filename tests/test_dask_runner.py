"""Every pipeline on a real dask.distributed cluster: a scheduler and 2 worker processes
on 127.0.0.1 (`dask scheduler`, `dask worker`, as a user starts them), driven with
`--runner DaskRunner --dask_scheduler_file F`. Each run's output and counters equal the
DirectRunner's on the same inputs; the runner's own promises (outputs by tag, every
branch, finish_bundle output, Read / Impulse / Reshuffle, counters, side inputs, setup
once per process) are checked on a small pipeline; a worker killed mid-run ends in the
same output and counts, or exit status 3, never exit 0 with less.

The option tests and the check of the Beam internals the runner relies on need no cluster
and run in the fast tier."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.fake_llm_server import FakeLLMServer
from tests.helpers import every_pipeline_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASK = pytest.importorskip("dask.distributed")


# --------------------------------------------------------------------------------------
# No cluster: options and the pin
# --------------------------------------------------------------------------------------


def test_runner_dask_is_accepted_and_its_options_listed(capsys):
    from pipelines import select_candidates

    with pytest.raises(SystemExit) as e:
        select_candidates.run(["--runner", "DaskRunner", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dask_client_address", "--dask_scheduler_file", "--dask_npartitions", "--dask_connection_timeout"):
        assert flag in text
    with pytest.raises(SystemExit):
        select_candidates.run(["--runner", "DaskRunner", "--dask_client_adress", "tcp://x:1", "--entity_index", "i",
                               "--captions", "c", "--output", "o"])
    assert "--dask_client_adress (did you mean --dask_client_address?)" in capsys.readouterr().err


def test_runner_name_becomes_the_class_beam_can_load():
    from apache_beam.options.pipeline_options import StandardOptions

    from transforms.run.options import DASK_RUNNER, new_parser, parse

    for argv in (["--runner", "DaskRunner"], ["--runner=DaskRunner"], ["--runner", "daskrunner"]):
        _, options = parse(new_parser("t"), argv)
        assert options.view_as(StandardOptions).runner == DASK_RUNNER
    _, options = parse(new_parser("t"), ["--runner", "DirectRunner"])
    assert options.view_as(StandardOptions).runner == "DirectRunner"


def test_the_beam_internals_the_runner_relies_on():
    """Fails with a plain message when a Beam upgrade moves what the runner uses: one
    bundle through `run_stage` (DoFnRunner, Receiver, the state sampler's metrics
    container), a GroupByKey exchange, the override classes, DirectMetrics, DaskOptions."""
    import apache_beam as beam
    from apache_beam.internal import pickler
    from apache_beam.metrics import Metrics
    from apache_beam.runners.dask import overrides
    from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunner
    from apache_beam.runners.direct.direct_metrics import DirectMetrics
    from apache_beam.transforms.core import Windowing
    from apache_beam.transforms.window import GlobalWindows

    from transforms.run import dask_runner as dr

    why = (f"apache-beam {beam.__version__}: transforms/run/dask_runner.py relies on this Beam internal; check the runner "
           "against this Beam (the tests in this file) before adding the version to SUPPORTED_BEAM")
    assert ".".join(beam.__version__.split(".")[:2]) in dr.SUPPORTED_BEAM, why
    for name in ("_Create", "_Read", "_Reshuffle", "_GroupByKeyOnly", "_Flatten", "dask_overrides"):
        assert hasattr(overrides, name), f"{why}: apache_beam.runners.dask.overrides.{name}"
    assert "values" in overrides._Create.__dataclass_fields__ and "source" in overrides._Read.__dataclass_fields__, why
    assert issubclass(dr.DaskRunner, DaskRunner), why
    dests = {a.dest for a in _actions(DaskOptions)}
    assert {"address", "scheduler_file", "npartitions", "timeout", "name", "connection_limit"} <= dests, why

    class Tagged(beam.DoFn):
        def process(self, x):
            Metrics.counter("t", "n").inc()
            yield beam.pvalue.TaggedOutput("odd", x) if x % 2 else x

    try:
        step = ["step", pickler.dumps(Tagged()), [], {}, Windowing(GlobalWindows()), [], None]
        part = dr.run_stage("r", 0, pickler.dumps([step]), None, [dr.run_create([1, 2, 3, 4])])
        metrics = DirectMetrics()
        metrics.commit_logical(None, part.metrics[0])
    except Exception as e:  # noqa: BLE001 - the message is the point
        pytest.fail(f"{why}: {type(e).__name__}: {e}")
    assert [wv.value for wv in part.get(("step", None))] == [2, 4], why
    assert [wv.value for wv in part.get(("step", "odd"))] == [1, 3], why
    (n,) = metrics.query()["counters"]
    assert n.key.metric.name == "n" and n.committed == 4, why
    dr.teardown_run("r")
    coder = dr._key_coder(type("PC", (), {"element_type": beam.typehints.Tuple[str, int]})(), "gbk")
    buckets = dr.scatter("group", coder, 2, None, [dr.run_create([("a", 1), ("b", 2), ("a", 3)])])
    grouped = {k: v for p in (dr.gather("group", coder, j, buckets) for j in range(2)) for k, v in (w.value for w in p.get(None))}
    assert {k: [w.value if hasattr(w, "value") else w for w in v] for k, v in grouped.items()} == {"a": [1, 3], "b": [2]}, why


def _actions(options_cls):
    import argparse

    p = argparse.ArgumentParser()
    options_cls._add_argparse_args(p)
    return p._actions


def test_an_untested_beam_is_refused_naming_the_pin(monkeypatch):
    import apache_beam as beam

    from transforms.run import dask_runner

    monkeypatch.setattr(beam, "__version__", "9.1.0")
    with pytest.raises(RuntimeError, match=r"tested with apache-beam 2\.77\.x .* this is apache-beam 9\.1\.0"):
        dask_runner.check_beam_version()


# --------------------------------------------------------------------------------------
# A real cluster
# --------------------------------------------------------------------------------------


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", NO_GCE_CHECK="true", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")


class Cluster:
    """`dask scheduler` and 2 `dask worker` processes (each under its nanny, which starts
    it again when it dies) on 127.0.0.1."""

    def __init__(self, folder):
        self.file = str(folder / "scheduler.json")
        dask = os.path.join(os.path.dirname(sys.executable), "dask")
        common = ["--no-dashboard"]
        self.procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", self.file,
                                        *common], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)]
        deadline = time.time() + 60
        while not os.path.exists(self.file) and time.time() < deadline:
            time.sleep(0.2)
        for i in range(2):
            self.procs.append(subprocess.Popen(
                [dask, "worker", "--scheduler-file", self.file, "--nthreads", "1", "--host", "127.0.0.1", "--name", f"w{i}",
                 "--local-directory", str(folder / f"w{i}"), *common],
                env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        with self.client() as c:
            c.wait_for_workers(2, timeout=120)

    def client(self):
        return DASK.Client(scheduler_file=self.file, timeout=60)

    def worker_pids(self) -> dict:
        with self.client() as c:
            return c.run(os.getpid)

    def stop(self):
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dask"))
    yield c
    c.stop()


def _on(cluster) -> list[str]:
    return ["--runner", "DaskRunner", "--dask_scheduler_file", cluster.file]


def _counters(out) -> dict:
    """A run's record counters; not compared: how many files the records went into (one
    per bundle with --num_shards 0: runners cut bundles differently), shuffle sizes, time,
    retries and the fake endpoint's prefix-cache hits (they follow request order)."""
    m = json.load(open(os.path.join(out, "manifest.json")))
    return {k: v for k, v in m["counters"].items()
            if not k.startswith(("shuffle_", "files_written_")) and not k.endswith("_ms_total") and "_ms_" not in k
            and k not in ("llm_cached_input_tokens", "io_retries")}


def _rows(pattern) -> list[dict]:
    files = sorted(glob.glob(pattern))
    assert files, pattern
    return pq.read_table(files).to_pylist()


@pytest.mark.slow
def test_the_runner_keeps_what_beams_dask_runner_loses(cluster, tmp_path):
    """Outputs by tag, every branch computed, finish_bundle output, Read / Impulse /
    Reshuffle, counters (committed = attempted), side inputs, setup once per process, and
    CombinePerKey lifted (combined in each bundle before the exchange)."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    from transforms.run.options import DASK_RUNNER

    class Split(beam.DoFn):
        def setup(self):
            Metrics.counter("t", "setups").inc()  # counted in the first bundle's container

        def start_bundle(self):
            self.held = []

        def process(self, x):
            Metrics.counter("t", "seen").inc()
            if x % 3 == 0:
                yield beam.pvalue.TaggedOutput("three", x)
            else:
                self.held.append(x)

        def finish_bundle(self):
            for x in self.held:
                yield WindowedValue(x, 0, [GlobalWindow()])

    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i}\n" for i in range(50)))
    out = tmp_path / "out"
    options = PipelineOptions([f"--runner={DASK_RUNNER}", f"--dask_scheduler_file={cluster.file}", "--dask_npartitions=4"])
    p = beam.Pipeline(options=options)
    split = p | beam.Create(range(100)) | beam.ParDo(Split()).with_outputs("three", main="rest")
    factor = p | "Factor" >> beam.Create([("f", 10)])
    (split.three | beam.Map(lambda x, d: (x % 5, x * d["f"]), d=beam.pvalue.AsDict(factor)) | beam.GroupByKey()
     | beam.MapTuple(lambda k, v: json.dumps([k, sorted(v)])) | "Three" >> beam.io.WriteToText(str(out / "three")))
    (split.rest | beam.Reshuffle() | beam.combiners.Count.Globally() | "Rest" >> beam.io.WriteToText(str(out / "rest")))
    (p | beam.io.ReadFromText(str(src)) | "Lines" >> beam.combiners.Count.Globally()
     | "WriteLines" >> beam.io.WriteToText(str(out / "lines")))
    (p | "Start" >> beam.Impulse() | beam.Map(lambda b: f"impulse {len(b)}") | "Impulse" >> beam.io.WriteToText(str(out / "impulse")))

    class Sum(beam.CombineFn):
        def create_accumulator(self):
            return 0

        def add_input(self, acc, x):
            return acc + x

        def merge_accumulators(self, accs):
            Metrics.counter("t", "merged").inc()  # only a lifted combine merges partial sums
            return sum(accs)

        def extract_output(self, acc):
            return acc

    (p | "Pairs" >> beam.Create([(i % 2, i) for i in range(100)]) | beam.CombinePerKey(Sum())
     | beam.MapTuple(lambda k, v: f"{k} {v}") | "Sums" >> beam.io.WriteToText(str(out / "sums")))
    result = p.run()
    result.wait_until_finish()

    def read(name):
        return [line for f in sorted(glob.glob(str(out / f"{name}-*"))) for line in open(f).read().splitlines()]

    three = dict(json.loads(line) for line in read("three"))
    assert three == {k: sorted(x * 10 for x in range(0, 100, 3) if x % 5 == k) for k in range(5)}
    assert read("rest") == ["66"]  # every non-multiple of 3, all emitted in finish_bundle
    assert read("lines") == ["50"] and read("impulse") == ["impulse 0"]
    assert sorted(read("sums")) == [f"0 {sum(range(0, 100, 2))}", f"1 {sum(range(1, 100, 2))}"]
    counters = {c.key.metric.name: c for c in result.metrics().query(MetricsFilter().with_namespace("t"))["counters"]}
    assert counters["seen"].committed == counters["seen"].attempted == 100
    assert counters["merged"].committed >= 2  # CombinePerKey combined in each bundle before the exchange
    # Four bundles, two single-threaded worker processes: set up at most once in each.
    assert 1 <= counters["setups"].committed <= 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, catalog_path):
    return every_pipeline_inputs(tmp_path_factory.mktemp("dask_inputs"), catalog_path)


@pytest.mark.slow
def test_every_pipeline_on_dask_equals_the_direct_runner(cluster, inputs, tmp_path):
    from pipelines import (
        build_codes,
        build_entity_index,
        decontaminate,
        oven_to_shards,
        refine,
        select_candidates,
    )

    direct, dask = tmp_path / "direct", tmp_path / "dask"

    def both(run, argv_of):
        a = run(argv_of(direct))
        b = run([*argv_of(dask), *_on(cluster)])
        assert a["count_check"] == b["count_check"] == "ok"
        return a, b

    both(build_entity_index.run, lambda root: ["--entities", inputs["catalog"], "--output", f"{root}/index"])
    assert _counters(dask / "index") == _counters(direct / "index")
    assert _rows(f"{dask}/index/entities.parquet") == _rows(f"{direct}/index/entities.parquet")
    np.testing.assert_allclose(np.load(dask / "index" / "embeddings.npy"), np.load(direct / "index" / "embeddings.npy"), atol=1e-5)
    runner = json.load(open(dask / "index" / "manifest.json"))["runner"]
    assert runner == {"name": "DaskRunner", "workers": 2, "threads": 2, "hosts": 1}, runner

    both(select_candidates.run, lambda root: ["--entity_index", f"{root}/index", "--captions", inputs["wds"],
                                              "--caption_format", "webdataset", "--k", "100", "--min_score", "-1",
                                              "--output", f"{root}/cands"])
    assert _counters(dask / "cands") == _counters(direct / "cands")
    got = {(r["key"], r["qid"]): r["score"] for r in _rows(f"{dask}/cands/candidates-*.parquet")}
    want = {(r["key"], r["qid"]): r["score"] for r in _rows(f"{direct}/cands/candidates-*.parquet")}
    assert sorted(got) == sorted(want) and len(got) == 60
    assert max(abs(got[k] - want[k]) for k in want) < 1e-5

    clip = ["--clip_model", "ViT-S-32", "--clip_pretrained", "none", "--threshold", "0.9999", "--formats", "parquet"]
    both(decontaminate.run, lambda root: ["--input", f"{root}/cands/candidates-*.parquet", "--eval_images", inputs["eval"],
                                          "--output", f"{root}/shards", *clip])
    assert _counters(dask / "shards") == _counters(direct / "shards")
    keys = sorted(r["key"] for r in _rows(f"{dask}/shards/samples-*.parquet"))
    assert keys == sorted(r["key"] for r in _rows(f"{direct}/shards/samples-*.parquet")) and len(keys) == 59

    def verdicts(root):
        return sorted((r["key"], r["qid"], r["verdict"]) for r in _rows(f"{root}/samples-*.parquet"))

    with FakeLLMServer() as llm:
        # The loopback endpoint: the Dask run's answers are stored in its own cache.
        both(refine.run, lambda root: ["--input", f"{root}/shards/samples-*.parquet", "--entities", inputs["catalog"],
                                       "--entity_index", f"{root}/index", "--output", f"{root}/rew", "--model", "fake-vlm",
                                       "--cache", f"{root}/cache", "--formats", "parquet", "--llm_backend", "openai",
                                       "--endpoint", llm.url])
    assert _counters(dask / "rew") == _counters(direct / "rew")
    assert verdicts(dask / "rew") == verdicts(direct / "rew") and verdicts(dask / "rew")
    # Replay: the same answers from the cache alone, on Dask.
    both(refine.run, lambda root: ["--input", f"{root}/shards/samples-*.parquet", "--entities", inputs["catalog"],
                                   "--entity_index", f"{root}/index", "--output", f"{root}/replay", "--model", "fake-vlm",
                                   "--cache", f"{root}/cache", "--formats", "parquet", "--llm_backend", "replay"])
    assert verdicts(dask / "replay") == verdicts(direct / "rew")

    both(build_codes.run, lambda root: ["--entity_index", f"{root}/index", "--tokenizer", inputs["vocab"], "--output", f"{root}/codes"])
    assert _rows(f"{dask}/codes/codes.parquet") == _rows(f"{direct}/codes/codes.parquet")
    assert _counters(dask / "codes") == _counters(direct / "codes")

    both(oven_to_shards.run, lambda root: ["--oven", inputs["oven"], "--images", inputs["images"], "--output", f"{root}/oven",
                                           "--formats", "parquet"])
    assert sorted(r["key"] for r in _rows(f"{dask}/oven/samples-*.parquet")) == [f"d{i:03d}" for i in range(20)]
    assert _counters(dask / "oven") == _counters(direct / "oven")


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(cluster, inputs, tmp_path):
    """One worker process SIGKILLed while select_candidates runs: its nanny starts it again
    and Dask re-runs its tasks. The run ends with the output and counts of an undisturbed
    run, or exits 3 saying the output is incomplete; never exit 0 with less."""
    from pipelines import build_entity_index, select_candidates

    index = str(tmp_path / "index")
    build_entity_index.run(["--entities", inputs["catalog"], "--output", index])

    def args(out):
        return ["--entity_index", index, "--captions", inputs["wds"], "--caption_format", "webdataset", "--k", "100",
                "--min_score", "-1", "--output", str(out)]

    clean = select_candidates.run(args(tmp_path / "clean"))
    victim = sorted(cluster.worker_pids().values())[0]
    killed = threading.Event()

    def kill_when_busy():
        # Once the run has started tasks (the launcher's output folder exists), kill.
        deadline = time.time() + 120
        while not (tmp_path / "out").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        killed.set()

    t = threading.Thread(target=kill_when_busy, daemon=True)
    t.start()
    proc = subprocess.run([sys.executable, "-m", "pipelines.select_candidates", *args(tmp_path / "out"), *_on(cluster)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    t.join(5)
    assert killed.is_set()
    print(f"worker {victim} killed; the run exited {proc.returncode}")
    if proc.returncode == 3:
        assert "incomplete" in proc.stderr.strip().splitlines()[-1]
        assert not os.path.exists(tmp_path / "out" / "manifest.json")
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = sorted((r["key"], r["qid"]) for r in _rows(f"{tmp_path}/out/candidates-*.parquet"))
        want = sorted((r["key"], r["qid"]) for r in _rows(f"{tmp_path}/clean/candidates-*.parquet"))
        assert got == want and len(got) == len(set(got))
        assert _counters(tmp_path / "out") == _counters(tmp_path / "clean")
        assert clean["count_check"] == "ok"
    # The nanny started the worker again: the cluster has 2 workers for the next run.
    with cluster.client() as c:
        c.wait_for_workers(2, timeout=120)


def test_chains_of_pardos_are_fused_into_one_task_per_partition():
    """Map -> Map -> Map with one reader each is one task per partition; a PCollection read
    by two steps, or a side input, ends a stage."""
    import apache_beam as beam
    from apache_beam.runners.dask.overrides import dask_overrides

    from transforms.run import dask_runner as dr

    p = beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--runner=DirectRunner"]))
    base = p | beam.Create(range(10)) | "A" >> beam.Map(lambda x: x + 1) | "B" >> beam.Map(lambda x: x * 2)
    _ = base | "C" >> beam.Map(str)
    _ = base | "D" >> beam.Map(lambda x: -x) | "E" >> beam.Map(abs)
    p.replace_all(dask_overrides())
    consumers = dr._Consumers()
    p.visit(consumers)
    builder = dr._GraphBuilder("r", 2, consumers.count)
    p.visit(builder)
    builder.leaves()
    stages = {k.split("-")[1] for k in (t.key for t in builder.tasks) if k.startswith("stage-")}
    # A+B fused (B's output has two readers: the stage ends), C alone, D+E fused.
    assert stages == {"A_1", "C", "D_1"}, stages
    assert sum(1 for t in builder.tasks if t.key.startswith("stage-")) == 3 * 2  # 3 stages x 2 partitions


def test_dask_giving_up_on_a_task_is_exit_3_naming_the_gap(capsys):
    """A task whose workers kept dying (Dask's KilledWorker, after `allowed-failures`)
    fails the command with exit status 3 and one line: the output is incomplete."""
    from distributed.scheduler import KilledWorker

    from transforms.run.cli import exit_code

    def run(argv):
        from types import SimpleNamespace

        raise RuntimeError("the run failed") from KilledWorker("stage-Embed-3", SimpleNamespace(address="tcp://127.0.0.1:40001"), 3)

    assert exit_code(run, []) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: Dask gave up on a task after the workers running it died")
    assert "the output is incomplete and no manifest claims it" in last and "run the same command again" in last
