"""Beam pipelines on a Dask cluster (`--runner DaskRunner`): a workstation's processes,
Slurm through dask-jobqueue, Kubernetes through dask-kubernetes.

Beam ships a DaskRunner (`apache_beam.runners.dask`). As shipped it cannot run our jobs: a
multi-output step hands every output to every consumer, only the last leaf is computed,
what a DoFn emits in `finish_bundle` is lost (every file sink writes nothing), `Read` and
`Impulse` produce nothing, `Reshuffle` does not redistribute, and no counter comes back.
This runner keeps its options (`DaskOptions`: `--dask_client_address`, ...) and its
transform overrides, and builds the Dask graph itself:

- one task per partition of every primitive step, as `dask.delayed` calls; a step's
  outputs are kept apart by tag, and each consumer reads only its own tag;
- a ParDo partition runs as a Beam bundle (`DoFnRunner`: start, process, finish), so what
  `finish_bundle` emits is kept; side inputs are whole PCollections handed to each task as
  task dependencies (Dask moves them to a worker once), not recomputed;
- a DoFn instance is set up once per worker process and reused by later bundles (one
  instance per thread at a time, as in Beam's SDK harness), so models load once per
  process; they are torn down when the run ends;
- `Read` splits its source on the launcher (one task per split), `Impulse` is one
  element, `Create` is cut into partitions, and `GroupByKey` and `Reshuffle` are
  all-to-all exchanges between tasks (keys hashed from their deterministic encoding);
- counters: every ParDo task runs under a metrics container of its own and returns its
  counts with its data. Only results of tasks that finished count: a task Dask re-runs
  (its worker died) gives one result, never two, so counts do not double;
- a task re-run gives the same output: Python's `random` is seeded per task (Beam's
  sinks pick shard keys with it), so consumers that already read the first attempt's
  output and those that read the re-run agree.

Batch pipelines in the global window only (what our pipelines are); a splittable DoFn
or a stateful one is refused with an error naming the step.

The runner relies on Beam internals (`DoFnRunner`, the Dask overrides, `DirectMetrics`):
`SUPPORTED_BEAM` names the Beam versions it is tested with, and
`tests/test_dask_runner.py` fails with a plain message when those internals change.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import uuid
import zlib
from collections import defaultdict
from typing import Any, Optional

import apache_beam as beam
from apache_beam.internal import pickler
from apache_beam.runners.dask.dask_runner import DaskOptions  # noqa: F401 - registers --dask_* options
from apache_beam.runners.dask.dask_runner import DaskRunner as _BeamDaskRunner
from apache_beam.runners.runner import PipelineResult, PipelineState
from apache_beam.utils.windowed_value import WindowedValue

log = logging.getLogger(__name__)

# Beam versions whose internals this runner was tested against (major.minor).
SUPPORTED_BEAM = ("2.77",)


def _global(value) -> WindowedValue:
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP

    return value if isinstance(value, WindowedValue) else WindowedValue(value, MIN_TIMESTAMP, (GlobalWindow(),))


# --------------------------------------------------------------------------------------
# Task bodies (run on the workers)
# --------------------------------------------------------------------------------------


class Part:
    """What one task returns: its output elements by tag (None: the main output) and the
    counters it incremented."""

    __slots__ = ("by_tag", "metrics")

    def __init__(self, by_tag: dict, metrics=None):
        self.by_tag, self.metrics = by_tag, metrics

    def get(self, tag) -> list:
        return self.by_tag.get(tag, [])


def _elements(parts, tag) -> list:
    return [wv for p in parts for wv in p.get(tag)]


# DoFn instances set up in this worker process: (run, step) -> idle instances.
_POOL: dict = defaultdict(list)
_POOL_LOCK = threading.Lock()


def _take_dofn(run: str, step: str, payload: bytes):
    with _POOL_LOCK:
        idle = _POOL[(run, step)]
        if idle:
            return idle.pop(), False
    return pickler.loads(payload), True


def _give_back(run: str, step: str, fn) -> None:
    with _POOL_LOCK:
        _POOL[(run, step)].append(fn)


def teardown_run(run: str) -> int:
    """Tear down this process's DoFn instances of a run and reset what modules keep per
    process (`process_state`), on every worker when the run ends; returns how many DoFns."""
    from transforms.run.process_state import reset_all

    with _POOL_LOCK:
        mine = [(k, fns) for k, fns in _POOL.items() if k[0] == run]
        for k, _ in mine:
            del _POOL[k]
    n = 0
    for _, fns in mine:
        for fn in fns:
            try:
                fn.teardown()
            except Exception as e:  # noqa: BLE001 - a teardown's failure must not fail a finished run
                log.warning("teardown of %s failed: %s", type(fn).__name__, e)
            n += 1
    reset_all()
    return n


def _seed(run: str, step: str, index: int) -> None:
    random.seed(zlib.crc32(f"{run}/{step}/{index}".encode()))


def run_stage(run: str, index: int, steps: list, main_tag, main_parts, *side_parts) -> Part:
    """One bundle of a fused stage: a chain of ParDos, each fed element by element by the
    one before it (`steps[i]` = (label, payload, args, kwargs, windowing, side_specs,
    chained_tag): its output `chained_tag` goes to step i+1 and nowhere else). The input is
    the `main_tag` output of `main_parts`; the Part holds every other output under
    (label, tag), and one counter update per step. Finishing runs in order, so what a
    step emits in `finish_bundle` still reaches the steps after it."""
    from apache_beam.metrics.execution import MetricsContainer
    from apache_beam.runners.common import DoFnRunner, Receiver
    from apache_beam.runners.worker import statesampler
    from apache_beam.transforms.sideinputs import SideInputMap
    from apache_beam.utils import counters

    if isinstance(steps, bytes):
        steps = pickler.loads(steps)
    _seed(run, steps[0][0], index)
    sampler = statesampler.StateSampler(steps[0][0], counters.CounterFactory())
    previous = statesampler.get_current_tracker()
    statesampler.set_current_tracker(sampler)
    by_tag: dict = {}
    runners, states, containers, taken = [], [], [], []

    class Chained(Receiver):
        def __init__(self, i):
            self.i = i

        def receive(self, windowed_value):
            with states[self.i]:
                runners[self.i].process(windowed_value)

    class Keep(Receiver):
        def __init__(self, out):
            self.out = out

        def receive(self, windowed_value):
            self.out.append(windowed_value)

    class Outputs(dict):
        def __init__(self, label, chained_tag, next_i):
            super().__init__()
            self.label, self.chained_tag, self.next_i = label, chained_tag, next_i

        def __missing__(self, tag):
            if self.next_i is not None and tag == self.chained_tag:
                r = Chained(self.next_i)
            else:
                r = Keep(by_tag.setdefault((self.label, tag), []))
            self[tag] = r
            return r

    try:
        side_iter = iter(_split(side_parts, [spec for step in steps for spec in step[5]]))
        for i, (label, payload, args, kwargs, windowing, side_specs, chained_tag) in enumerate(steps):
            side_inputs = [SideInputMap(view_type, view_options, _elements(next(side_iter), side_tag))
                           for view_type, view_options, _n, side_tag in side_specs]
            fn, fresh = _take_dofn(run, label, payload)
            taken.append((label, fn))
            containers.append(MetricsContainer(label))
            states.append(sampler.scoped_state(label, "process", metrics_container=containers[-1]))
            outputs = Outputs(label, chained_tag, i + 1 if i + 1 < len(steps) else None)
            with states[-1]:
                runner = DoFnRunner(fn, args, kwargs, side_inputs, windowing, tagged_receivers=outputs, step_name=label)
                if fresh:
                    runner.setup()
            runners.append(runner)
        for i, runner in enumerate(runners):
            with states[i]:
                runner.start()
        with states[0]:
            for wv in _elements(main_parts, main_tag):
                runners[0].process(wv)
        for i, runner in enumerate(runners):
            with states[i]:
                runner.finish()
    finally:
        statesampler.set_current_tracker(previous)
    for label, fn in taken:
        _give_back(run, label, fn)
    return Part(by_tag, [c.get_cumulative() for c in containers])


def _split(side_parts, side_specs) -> list:
    out, i = [], 0
    for spec in side_specs:
        out.append(side_parts[i: i + spec[2]])
        i += spec[2]
    return out


def run_read(run: str, step: str, index: int, bundle) -> Part:
    _seed(run, step, index)
    source = bundle.source
    tracker = source.get_range_tracker(bundle.start_position, bundle.stop_position)
    return Part({None: [_global(x) for x in source.read(tracker)]})


def run_create(values: list) -> Part:
    return Part({None: [_global(v) for v in values]})


def scatter(kind: str, key_coder, n: int, tag, parts) -> list:
    """An input partition cut into `n` buckets: by the hash of each key's encoding
    (GroupByKey), or in turn from its position (Reshuffle: deterministic, so a re-run of
    the task cuts the same way)."""
    buckets: list = [[] for _ in range(n)]
    for i, wv in enumerate(_elements(parts, tag)):
        if kind == "group":
            key = wv.value[0]
            b = zlib.crc32(key_coder.encode(key)) % n
            buckets[b].append(wv)
        else:
            buckets[i % n].append(wv)
    return buckets


def gather(kind: str, key_coder, j: int, *scattered) -> Part:
    """Bucket `j` of every input partition, as one output partition: grouped by key for
    GroupByKey (the values in the order they came), as they are for Reshuffle."""
    if kind != "group":
        return Part({None: [wv for s in scattered for wv in s[j]]})
    groups: dict = {}
    for s in scattered:
        for wv in s[j]:
            k, v = wv.value
            enc = key_coder.encode(k)
            if enc not in groups:
                groups[enc] = (k, [])
            groups[enc][1].append(v)
    return Part({None: [_global((k, vs)) for k, vs in groups.values()]})


def metrics_of(part: Part):
    return part.metrics


def finished(n_metrics: int, *done) -> list:
    """The counter updates of every stage task (the first `n_metrics` arguments: a list per
    task, one per step); the rest are the leaves' element counts, there so every branch is
    computed."""
    return [u for m in done[:n_metrics] if m for u in (m if isinstance(m, list) else [m])]


# --------------------------------------------------------------------------------------
# The launcher: graph building, result
# --------------------------------------------------------------------------------------


class DaskRunnerResult(PipelineResult):
    """A run on a Dask cluster: `wait_until_finish` waits for every task and merges the
    counters of the tasks that finished; `metrics()` answers like the DirectRunner's."""

    def __init__(self, client, future, run_id: str, own_client: bool, cluster: dict):
        from apache_beam.runners.direct.direct_metrics import DirectMetrics

        super().__init__(PipelineState.RUNNING)
        self.client, self.future, self.run_id, self.own_client, self.cluster = client, future, run_id, own_client, cluster
        self._metrics = DirectMetrics()

    def wait_until_finish(self, duration=None) -> str:
        if self._state in (PipelineState.DONE, PipelineState.FAILED):
            return self._state
        try:
            updates = self.future.result(timeout=None if duration is None else duration / 1000)
            for u in updates:
                self._metrics.commit_logical(None, u)
                self._metrics.commit_physical(None, u)
            self._state = PipelineState.DONE
        except BaseException:
            self._state = PipelineState.FAILED
            raise
        finally:
            self._close()
        return self._state

    def _close(self) -> None:
        try:
            self.client.run(teardown_run, self.run_id)
        except Exception as e:  # noqa: BLE001 - workers may be gone; their processes then hold nothing
            log.warning("DoFn teardown on the Dask workers: %s", e)
        if self.own_client:
            self.client.close()

    def cancel(self) -> str:
        self.future.cancel()
        self._state = PipelineState.CANCELLED
        self._close()
        return self._state

    def metrics(self):
        return self._metrics


class DaskRunner(_BeamDaskRunner):
    """`--runner DaskRunner`: see the module's docstring."""

    def run_pipeline(self, pipeline, options):
        import dask
        import dask.distributed as ddist
        from apache_beam.runners.dask.overrides import dask_overrides

        check_beam_version()
        dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
        npartitions = dask_options.pop("npartitions", None)
        if dask_options.pop("partition_size", None):
            from transforms.errors import UsageError

            raise UsageError("--dask_partition_size is not used by this DaskRunner (sources split by size): "
                             "give --dask_npartitions N instead")
        own = not dask_options.get("address") and not dask_options.get("scheduler_file")
        client = ddist.Client(**dask_options)
        cluster = self.last_cluster = cluster_size(client)
        # Torch / faiss threads: each task's share of its machine's cores (ThreadBudget).
        client.run(set_slots, cluster["slots"])
        default_n = npartitions or max(1, 2 * cluster["threads"])
        pipeline.replace_all([_lift_combines_override(), *dask_overrides()])
        consumers = _Consumers()
        pipeline.visit(consumers)
        builder = _GraphBuilder(uuid.uuid4().hex[:12], default_n, consumers.count)
        pipeline.visit(builder)
        leaves = builder.leaves()  # (builds the stages nothing else read)
        done = dask.delayed(finished, pure=False)(len(builder.metric_tasks), *builder.metric_tasks, *leaves,
                                                  dask_key_name=f"finished-{builder.run}")
        future = client.compute(done)
        log.info("Dask: %d tasks on %d workers (%d threads)", len(builder.tasks), cluster["workers"], cluster["threads"])
        return DaskRunnerResult(client, future, builder.run, own, cluster)


def _lift_combines_override():
    from apache_beam.pipeline import PTransformOverride
    from apache_beam.transforms.combiners import LiftedCombinePerKey
    from apache_beam.transforms.core import CombinePerKey

    class LiftCombines(PTransformOverride):
        """CombinePerKey as Beam's lifted form: each bundle combines its values per key
        before the exchange (our top-K selection then moves at most K proposals per entity
        and bundle, not every proposal)."""

        def matches(self, applied):
            return isinstance(applied.transform, CombinePerKey) and applied.inputs[0].windowing.is_default()

        def get_replacement_transform_for_applied_ptransform(self, applied):
            t = applied.transform
            try:
                return LiftedCombinePerKey(t.fn, t.args, t.kwargs)
            except NotImplementedError:
                return t

    return LiftCombines()


def cluster_size(client) -> dict:
    """Workers, threads and machines of the cluster the client talks to; `slots`: tasks
    each machine runs at once (its workers' threads together), by host."""
    info = client.scheduler_info(n_workers=-1) if _takes_n_workers(client) else client.scheduler_info()
    workers = info.get("workers", {})
    slots: dict = defaultdict(int)
    for addr, w in workers.items():
        slots[_host(addr, w)] += int(w.get("nthreads", 1))
    return {"workers": len(workers), "threads": sum(slots.values()), "hosts": len(slots), "slots": dict(slots),
            "scheduler": info.get("address", "")}


def _host(addr: str, info: dict) -> str:
    return info.get("host") or str(addr).split("://", 1)[-1].rsplit(":", 1)[0]


def set_slots(slots: dict, dask_worker=None) -> int:
    """On each worker: how many tasks its machine runs at once (read by ThreadBudget)."""
    import os

    from transforms.run.job import DASK_SLOTS_ENV

    host = _host(dask_worker.address, {}) if dask_worker is not None else ""
    n = int(slots.get(host, 0)) or max(slots.values() or [1])
    os.environ[DASK_SLOTS_ENV] = str(n)
    return n


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def check_beam_version() -> None:
    """Refuse a Beam whose internals this runner was not tested with, naming the pin."""
    version = ".".join(beam.__version__.split(".")[:2])
    if version not in SUPPORTED_BEAM:
        raise RuntimeError(
            f"transforms.run.dask_runner is tested with apache-beam {', '.join(SUPPORTED_BEAM)}.x and relies on its "
            f"internals; this is apache-beam {beam.__version__}. Install a tested version (requirements.txt pins it) "
            "or run tests/test_dask_runner.py against this one and add it to SUPPORTED_BEAM")


class _Consumers(beam.pipeline.PipelineVisitor):
    """How many steps read each PCollection (a side input counts as two: never fused)."""

    def __init__(self):
        self.count: dict = defaultdict(int)

    def visit_transform(self, applied) -> None:
        for pc in applied.main_inputs.values():
            self.count[id(pc)] += 1
        for si in applied.side_inputs:
            self.count[id(si.pvalue)] += 2


class _Stage:
    """ParDos fused into one task per partition (`run_stage`), built when first read."""

    def __init__(self, main_parts: list, main_tag, steps: list, side_parts: list):
        self.main_parts, self.main_tag, self.steps, self.side_parts = main_parts, main_tag, steps, side_parts
        self.tasks: Optional[list] = None


class _GraphBuilder(beam.pipeline.PipelineVisitor):
    """Beam's primitive transforms -> `dask.delayed` tasks, one per partition. Chains of
    ParDos where each output has one reader are fused into one task (elements stream
    through the chain as in a Beam bundle; only a stage's other outputs are kept)."""

    def __init__(self, run: str, default_n: int, consumers: dict):
        self.run, self.default_n, self.consumers = run, default_n, consumers
        self.parts: dict = {}  # PCollection -> (list of delayed Parts | _Stage, tag within them)
        self.read: set = set()
        self.tasks: list = []
        self.metric_tasks: list = []
        self._names = itertools.count()

    def _key(self, what: str, label: str, i: int) -> str:
        safe = "".join(c if c.isalnum() else "_" for c in label)[:60]
        return f"{what}-{safe}-{next(self._names)}-{i}-{self.run}"

    def _parts_of(self, pc) -> tuple[list, Any]:
        """The delayed Parts holding `pc`, and its tag in them (a stage is built here)."""
        import dask

        self.read.add(id(pc))
        src, tag = self.parts[pc]
        if isinstance(src, _Stage):
            if src.tasks is None:
                label = src.steps[0][0] if len(src.steps) == 1 else f"{src.steps[0][0]}+{len(src.steps) - 1}"
                # The steps (pickled DoFns and their arguments) are one key of the graph,
                # moved to each worker once, not copied into every task.
                steps = dask.delayed(pickler.dumps(src.steps), name=self._key("steps", label, 0), traverse=False)
                src.tasks = [dask.delayed(run_stage, pure=False)(self.run, i, steps, src.main_tag, [p], *src.side_parts,
                                                                  dask_key_name=self._key("stage", label, i))
                             for i, p in enumerate(src.main_parts)]
                self.tasks += src.tasks
                self.metric_tasks += [dask.delayed(metrics_of, pure=False)(t) for t in src.tasks]
            return src.tasks, tag
        return src, tag

    def leaves(self) -> list:
        """Every partition of every PCollection no step reads: all branches are computed."""
        import dask

        out = []
        for pc in list(self.parts):
            if id(pc) not in self.read and self.consumers.get(id(pc), 0) == 0:
                parts, tag = self._parts_of(pc)
                out += [dask.delayed(_count, pure=False)(p, tag) for p in parts]
        return out

    def visit_transform(self, applied) -> None:
        import dask
        from apache_beam.runners.dask import overrides as ov

        t = applied.transform
        label = applied.full_label
        if isinstance(t, beam.ParDo):
            self._pardo(applied, label)
            return
        if isinstance(t, beam.Impulse):
            parts = [dask.delayed(run_create, pure=False)([b""], dask_key_name=self._key("impulse", label, 0))]
        elif isinstance(t, ov._Create):  # noqa: SLF001
            values = list(t.values)
            n = max(1, min(self.default_n, len(values)))
            chunks = [values[i::n] for i in range(n)] if values else [[]]
            parts = [dask.delayed(run_create, pure=False)(c, dask_key_name=self._key("create", label, i)) for i, c in enumerate(chunks)]
        elif isinstance(t, ov._Read):  # noqa: SLF001
            parts = self._read(t.source, label)
        elif isinstance(t, ov._GroupByKeyOnly):  # noqa: SLF001
            parts = self._exchange("group", applied, label)
        elif isinstance(t, ov._Reshuffle):  # noqa: SLF001
            parts = self._exchange("reshuffle", applied, label)
        elif isinstance(t, ov._Flatten):  # noqa: SLF001
            parts = []
            for pc in applied.main_inputs.values():
                src, tag = self._parts_of(pc)
                parts += [dask.delayed(_retag, pure=False)(p, tag) for p in src]
        else:
            raise NotImplementedError(
                f"DaskRunner: step {label!r} is a {type(t).__name__}, which this runner does not translate "
                "(batch pipelines of ParDo, GroupByKey, Flatten, Create, Read, Impulse and Reshuffle)")
        self.tasks += parts
        for pc in applied.outputs.values():
            self.parts[pc] = (parts, None)

    def _read(self, source, label) -> list:
        import dask

        size = 0
        try:
            size = source.estimate_size() or 0
        except Exception:  # noqa: BLE001 - some sources cannot say
            pass
        desired = max(1 << 20, size // max(1, self.default_n)) if size else 64 << 20
        bundles = list(source.split(desired_bundle_size=desired))
        return [dask.delayed(run_read, pure=False)(self.run, label, i, b, dask_key_name=self._key("read", label, i))
                for i, b in enumerate(bundles)] or [dask.delayed(run_create, pure=False)([])]

    def _pardo(self, applied, label) -> None:
        from apache_beam.runners.common import DoFnSignature

        t = applied.transform
        fn = t.fn
        sig = DoFnSignature(fn)
        if sig.is_splittable_dofn():
            raise NotImplementedError(f"DaskRunner: step {label!r} is a splittable DoFn ({type(fn).__name__}), not supported")
        if sig.is_stateful_dofn():
            raise NotImplementedError(f"DaskRunner: step {label!r} is a stateful DoFn ({type(fn).__name__}), not supported")
        (main,) = applied.main_inputs.values()
        side_specs, side_parts = [], []
        for si in applied.side_inputs:
            sparts, stag = self._parts_of(si.pvalue)
            side_specs.append((type(si), si._view_options(), len(sparts), stag))  # noqa: SLF001
            side_parts += sparts
        step = [label, pickler.dumps(fn), getattr(t, "args", []) or [], getattr(t, "kwargs", {}) or {}, _windowing(main),
                side_specs, None]
        src, tag = self.parts[main]
        if isinstance(src, _Stage) and src.tasks is None and self.consumers.get(id(main)) == 1 \
                and isinstance(tag, tuple) and tag[0] == src.steps[-1][0]:
            # The stage's last step feeds this one alone: one more step of the same task.
            self.read.add(id(main))
            src.steps[-1][6] = tag[1]
            src.steps.append(step)
            src.side_parts += side_parts
            stage = src
        else:
            parts, main_tag = self._parts_of(main)
            stage = _Stage(parts, main_tag, [step], side_parts)
        for tag_out, pc in applied.outputs.items():
            self.parts[pc] = (stage, (label, tag_out))

    def _exchange(self, kind: str, applied, label) -> list:
        import dask

        (main,) = applied.main_inputs.values()
        src, tag = self._parts_of(main)
        key_coder = _key_coder(main, label) if kind == "group" else None
        # GroupByKey keeps the partition count (at most the default); Reshuffle spreads
        # over the default (2 per worker thread, or --dask_npartitions).
        n = min(max(len(src), 1), self.default_n) if kind == "group" else self.default_n
        scattered = [dask.delayed(scatter, pure=False)(kind, key_coder, n, tag, [p], dask_key_name=self._key(f"{kind}-out", label, i))
                     for i, p in enumerate(src)]
        return [dask.delayed(gather, pure=False)(kind, key_coder, j, *scattered, dask_key_name=self._key(f"{kind}-in", label, j))
                for j in range(n)]


def _key_coder(pcoll, label):
    from apache_beam import coders
    from apache_beam.typehints import typehints

    coder = None
    try:
        key_type, _ = typehints.trivial_inference.key_value_types(pcoll.element_type)
        coder = coders.registry.get_coder(key_type)
    except Exception:  # noqa: BLE001 - an untyped PCollection: the generic coder
        coder = coders.registry.get_coder(Any)
    try:
        return coder.as_deterministic_coder(label)
    except Exception:  # noqa: BLE001 - keys the coder cannot encode deterministically: pickled, sorted dicts
        return coders.registry.get_coder(Any)


def _windowing(pcoll):
    """A PCollection's windowing; the global window where Beam cannot say (the output of
    `Impulse`, whose windowing Beam asks of the pipeline's start)."""
    from apache_beam.transforms.core import Windowing
    from apache_beam.transforms.window import GlobalWindows

    try:
        return pcoll.windowing
    except AttributeError:
        return Windowing(GlobalWindows())


def _retag(part: Part, tag) -> Part:
    return Part({None: part.get(tag)})


def _count(part: Part, tag) -> int:
    return len(part.get(tag))
