"""What a run moved and what it wrote: per-shuffle counters and the end-of-run summary.

Every shuffle of a pipeline (GroupByKey, CoGroupByKey, a per-key or global combine) is
preceded by `MeasureShuffle(step)`, which counts the elements and the approximate bytes that
enter it as `shuffle_<step>_elements` / `shuffle_<step>_bytes`. A combine is measured on its
input, before Beam lifts the combiner, so its figure is an upper bound of what crosses the
network. `finish_run` turns the counters into the manifest's `shuffles` table, writes
`manifest.json` and prints the summary every pipeline ends with.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.common import METRICS_NAMESPACE, code_version, format_counters, write_json

SHUFFLE_PREFIX = "shuffle_"

# Fixed costs in the estimate: a number, and the framing of one field or container.
_SCALAR_BYTES = 8
_FIELD_BYTES = 2


def approx_size(value: Any, _depth: int = 0) -> int:
    """Approximate encoded size of a record in bytes: the payload of every string, bytes,
    array and number it holds, plus a small framing cost per field. It walks dataclasses,
    named tuples, tuples, lists and dicts; it pickles nothing, so it costs far less than the
    encoding it estimates."""
    if value is None or isinstance(value, bool):
        return 1
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) + _FIELD_BYTES
    if isinstance(value, str):
        return len(value) + _FIELD_BYTES  # UTF-8 is at least one byte per character
    if isinstance(value, (int, float, np.integer, np.floating)):
        return _SCALAR_BYTES
    if isinstance(value, np.ndarray):
        return int(value.nbytes) + _FIELD_BYTES
    if _depth > 8:
        return _SCALAR_BYTES
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(approx_size(getattr(value, f.name), _depth + 1) + _FIELD_BYTES for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list, set, frozenset)):
        return _FIELD_BYTES + sum(approx_size(v, _depth + 1) for v in value)
    if isinstance(value, dict):
        return _FIELD_BYTES + sum(approx_size(k, _depth + 1) + approx_size(v, _depth + 1) for k, v in value.items())
    inference = getattr(value, "inference", None)  # Beam's PredictionResult
    if inference is not None:
        return approx_size(tuple(value), _depth + 1)
    return _SCALAR_BYTES


class _Measure(beam.DoFn):
    def __init__(self, step: str):
        self.elements = Metrics.counter(METRICS_NAMESPACE, f"{SHUFFLE_PREFIX}{step}_elements")
        self.bytes = Metrics.counter(METRICS_NAMESPACE, f"{SHUFFLE_PREFIX}{step}_bytes")

    def process(self, element):
        self.elements.inc()
        self.bytes.inc(approx_size(element))
        yield element


class MeasureShuffle(beam.PTransform):
    """Pass-through that counts what is about to enter the shuffle `step`."""

    def __init__(self, step: str):
        super().__init__()
        if not step.replace("_", "").isalnum():
            raise ValueError(f"shuffle step names are [a-z0-9_]: {step!r}")
        self.step = step

    def expand(self, pcoll):
        return pcoll | beam.ParDo(_Measure(self.step))


def shuffle_report(counters: dict[str, int]) -> dict[str, dict[str, int]]:
    """{step: {"elements": n, "bytes": b}} from the `shuffle_*` counters."""
    out: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        if not name.startswith(SHUFFLE_PREFIX):
            continue
        for what in ("elements", "bytes"):
            if name.endswith(f"_{what}"):
                step = name[len(SHUFFLE_PREFIX) : -len(what) - 1]
                out.setdefault(step, {"elements": 0, "bytes": 0})[what] = value
    return dict(sorted(out.items()))


def format_shuffles(shuffles: dict[str, dict[str, int]]) -> str:
    if not shuffles:
        return "shuffles: none"
    width = max(len(s) for s in shuffles)
    lines = ["shuffles (elements / approx. bytes entering each)"]
    for step, v in shuffles.items():
        lines.append(f"  {step:<{width}}  {v['elements']:>12,}  {_human_bytes(v['bytes']):>10}")
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def finish_run(
    *,
    name: str,
    output: str,
    kind: str,
    counters: dict[str, int],
    seconds: float,
    started: dt.datetime,
    check: Callable[[dict], list[str]],
    fields: Optional[dict] = None,
    base: Optional[dict] = None,
    lines: tuple[str, ...] = (),
) -> dict:
    """Write `<output>/manifest.json` and print the run's summary.

    `base` is a manifest a step already wrote (its fields are kept); `fields` are this
    pipeline's own entries; counters, the shuffle table, the count check, timing and code
    version are added here so every manifest carries them the same way.
    """
    problems = check(counters)
    manifest = dict(base or {})
    manifest.update({"kind": kind, **(fields or {})})
    manifest.update(
        {
            "counters": counters,
            "shuffles": shuffle_report(counters),
            "count_check": problems or "ok",
            "seconds": round(seconds, 2),
            "code_version": code_version(),
            "created": started.isoformat(timespec="seconds"),
        }
    )
    out = output.rstrip("/")
    write_json(f"{out}/manifest.json", manifest)
    print(format_counters({k: v for k, v in counters.items() if not k.startswith(SHUFFLE_PREFIX)}, f"{name} counters"))
    print(format_shuffles(manifest["shuffles"]))
    print(f"count check: {manifest['count_check']}")
    for line in lines:
        print(line)
    return manifest


MAX_LISTED_INPUTS = 1000


def input_summary(pattern: str, files: list[str]) -> dict:
    """The inputs as a manifest records them: the pattern, the count, and the files
    themselves up to MAX_LISTED_INPUTS (a web corpus has hundreds of thousands)."""
    return {
        "pattern": pattern,
        "files": len(files),
        "listed": files[:MAX_LISTED_INPUTS],
        "truncated": len(files) > MAX_LISTED_INPUTS,
    }
