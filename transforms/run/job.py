"""Running a job: thread budgets per SDK process (decided on the worker), running a pipeline
with progress lines and reading its counters back, Beam's --dry_run (a Dataflow job built,
not submitted), and `run_job`, the tail every Beam command ends with."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Callable
from typing import Optional

from transforms.errors import UsageError
from transforms.run.manifest import prepare_output, remove_beam_temp
from transforms.run.version import code_version  # noqa: F401 - where commands found it before

METRICS_NAMESPACE = "entityforge"

log = logging.getLogger(__name__)


def machine_cores() -> int:
    """Cores this process may use on the machine it runs on (a container's CPU set, not
    the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_processes(options) -> int:
    """SDK processes sharing one machine's cores under these options; 0 = one per core of
    the worker (Dataflow's default for Python), known only on the worker itself."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = (options.view_as(StandardOptions).runner or "").lower()
    if "dataflow" in runner:
        experiments = options.get_all_options().get("experiments") or []
        if "no_use_multiple_sdk_containers" in experiments:
            return 1
        return 0
    direct = options.view_as(DirectOptions)
    if (direct.direct_running_mode or "") == "multi_processing":
        n = direct.direct_num_workers or 1
        return n if n > 0 else 0
    return 1


@dataclasses.dataclass(frozen=True)
class ThreadBudget:
    """Threads for torch / faiss in one SDK process, decided where the code runs.

    The launcher knows the runner's layout (`processes` per machine, 0 = one per core),
    but not the worker's cores: a laptop that launches a Dataflow job has 8, the worker
    32. `resolve()` is called in `load_model`, on the worker.
    """

    explicit: int = 0
    processes: int = 1

    def resolve(self) -> int:
        if self.explicit > 0:
            return self.explicit
        cores = machine_cores()
        processes = cores if self.processes <= 0 else self.processes
        # On a Dask worker the runner says how many tasks this machine runs at once (its
        # workers' threads together, `DASK_SLOTS_ENV`): each gets its share of the cores.
        slots = _dask_slots()
        if slots > 0:
            processes = max(processes, slots)
        return max(1, cores // processes)


DASK_SLOTS_ENV = "ENTITYFORGE_DASK_SLOTS_PER_MACHINE"


def _dask_slots() -> int:
    try:
        return max(0, int(os.environ.get(DASK_SLOTS_ENV, "0")))
    except ValueError:
        return 0


def threads_per_process(options, explicit: int = 0) -> ThreadBudget:
    """Cores / processes per machine (resolved on the worker), so faiss and torch do not
    oversubscribe a shared machine; `explicit` > 0 wins."""
    return ThreadBudget(explicit=max(0, explicit or 0), processes=worker_processes(options))


def resolve_threads(threads) -> int:
    """A ThreadBudget resolved here, or an int as given (0 = the library's default)."""
    if isinstance(threads, ThreadBudget):
        return threads.resolve()
    return int(threads or 0)


def query_counters(result, namespace: str = METRICS_NAMESPACE) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    counters: dict[str, int] = {}
    try:
        metrics = result.metrics().query(MetricsFilter().with_namespace(namespace))
    except Exception as e:  # noqa: BLE001 - some runners do not report metrics
        log.warning("could not read pipeline counters: %s", e)
        return counters
    for c in metrics["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(value or 0)
    return dict(sorted(counters.items()))


def sum_counters(counters: dict[str, int], prefix: str) -> int:
    """Records counted under every `prefix*` counter (file-level `*_files` counters excluded)."""
    return sum(v for k, v in counters.items() if k.startswith(prefix) and not k.endswith("_files"))


def run_and_count(pipeline, label: str = "pipeline", expected: Optional[tuple[str, int]] = None) -> tuple[dict[str, int], float]:
    """Run a pipeline to completion; its counters and wall seconds. On a local runner a
    progress line goes to stderr every --progress_interval seconds (transforms/run/progress.py);
    `expected` = (counter, final value) when the launcher knows it, for an ETA."""
    import contextlib
    import time

    from transforms.run import progress

    runner = type(pipeline.runner).__name__
    local = "Direct" in runner or "FnApi" in runner
    watch = progress.Progress(label, progress.INTERVAL, expected) if local else contextlib.nullcontext()
    started = time.perf_counter()
    with watch:
        result = pipeline.run()
        result.wait_until_finish()
    return query_counters(result), time.perf_counter() - started


def is_dry_run(options) -> bool:
    """Beam's `--dry_run`: the runner builds the job (for Dataflow: translates it) and
    submits nothing, so no counters and no outputs exist afterwards."""
    from apache_beam.options.pipeline_options import TestOptions

    return bool(options.view_as(TestOptions).dry_run)


def build_only(pipeline, name: str) -> dict:
    """Run a pipeline whose options say `--dry_run`; what the runner built, not a manifest.

    For the DataflowRunner the result carries the job it would submit: its size is what
    Dataflow's ~10 MB request limit applies to (data given to `beam.Create` is pickled
    into it, which is why the pipelines list their input files inside the job).
    """
    runner = type(pipeline.runner).__name__
    if "Dataflow" not in runner:
        # Only the DataflowRunner honours --dry_run; any other runner would run the job.
        raise UsageError(
            f"--dry_run builds a Dataflow job without submitting it; with {runner} it would run the "
            "pipeline. Add --runner DataflowRunner (and --no_auth --sdk_location container to build offline)"
        )
    result = pipeline.run()
    job = getattr(result, "job", None)
    summary: dict = {"dry_run": True, "pipeline": name, "runner": type(pipeline.runner).__name__}
    if job is not None:
        summary["pipeline_proto_bytes"] = job.proto_pipeline.ByteSize()
        summary["job_request_bytes"] = len(type(job.proto).serialize(job.proto))
        summary["transforms"] = len(job.proto_pipeline.components.transforms)
        summary["job"] = job
    detail = ""
    if job is not None:
        detail = (
            f" ({summary['transforms']} transforms, pipeline proto {summary['pipeline_proto_bytes']:,} bytes, "
            f"job request {summary['job_request_bytes']:,} bytes)"
        )
    print(f"{name}: built for {summary['runner']} without submitting{detail}")
    return summary



@dataclasses.dataclass(frozen=True)
class Ran:
    """What a finished pipeline run hands to its manifest (`finish_run(**ran.fields(), ...)`)."""

    counters: dict
    seconds: float
    started: dt.datetime
    runner: Optional[dict] = None

    def fields(self) -> dict:
        return {"counters": self.counters, "seconds": self.seconds, "started": self.started, "runner": self.runner}


def runner_info(pipeline, options) -> dict:
    """The runner of a finished run, for its manifest: its name and the size it ran at
    (a Dask cluster's workers, threads and machines; the local runner's processes)."""
    runner = pipeline.runner
    info: dict = {"name": type(runner).__name__}
    cluster = getattr(runner, "last_cluster", None)
    if cluster:
        info.update({k: cluster[k] for k in ("workers", "threads", "hosts") if k in cluster})
    elif "Dataflow" not in info["name"]:
        info["processes"] = worker_processes(options)
    return info


def run_job(
    pipeline,
    options,
    name: str,
    finish: Callable[[Ran], dict],
    *,
    output: Optional[str] = None,
    outputs: tuple[str, ...] = (),
    expected: Optional[tuple[str, int]] = None,
    execute: Optional[Callable[[], tuple]] = None,
) -> dict:
    """The tail of every Beam command: with Beam's `--dry_run` the job is built and nothing
    runs; otherwise `output` is made ready for a (re-)run (the shard files `outputs` of an
    earlier, possibly killed run removed, see `prepare_output`), the pipeline runs with
    progress lines (`expected` feeds the ETA), and `finish(ran)` writes the manifest and
    returns it. `execute` replaces the plain run where a command runs its pipeline its own
    way (refine's batch rounds, its vLLM servers): it returns (counters, seconds), or
    (None, status) when the run goes on later, and the status is returned."""
    if is_dry_run(options):
        return build_only(pipeline, name)
    if output is not None:
        prepare_output(output, outputs)
    started = dt.datetime.now(dt.UTC)
    if execute is None:
        counters, seconds = run_and_count(pipeline, name, expected)
    else:
        counters, seconds = execute()
        if counters is None:
            return seconds
    if output is not None:
        # Beam leaves an empty temporary folder behind a sink that wrote nothing (a reject
        # stage without rejects); the job finished, so none of them holds anything of it.
        remove_beam_temp(output)
    return finish(Ran(counters, seconds, started, runner_info(pipeline, options)))
