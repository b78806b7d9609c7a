"""Measuring what crosses each shuffle of a run: `MeasureShuffle` counts the elements and
approximate bytes entering a GroupByKey, CoGroupByKey, combine or Reshuffle (counters
`shuffle_<name>_elements` / `_bytes`), and `shuffle_report` / `format_shuffles` turn those
counters into the manifest's `shuffles` table and the table printed at the end of a run."""

from __future__ import annotations

import dataclasses
from typing import Any

import apache_beam as beam
import numpy as np

from transforms.run.progress import counter

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
        self.elements = counter(f"{SHUFFLE_PREFIX}{step}_elements")
        self.bytes = counter(f"{SHUFFLE_PREFIX}{step}_bytes")

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
