"""Progress lines for local runs.

Beam's local runner reports counters only when the pipeline ends, so a long run on a
laptop would print nothing for an hour. Every counter of this project goes through
`counter(name)`, which increments Beam's counter and, when progress is on, a tally in the
process; a daemon thread prints the tally to stderr every `interval` seconds:

    [select_candidates 2m30s] captions_rows_read 1,234,567 (8,230/s) · captions_searched 1,200,000 (8,000/s) · ... · ETA 4m10s

Progress is on for the local runners (`run_and_count` turns it on; `--progress_interval`
sets the interval, 0 turns it off) and off on Dataflow, whose console shows the same
counters live. The ETA is printed when the launcher knows how many records the run will
read (`expected`: a counter name and its final value, e.g. the rows of the input shards
listed in their manifest). With `--direct_num_workers N --direct_running_mode
multi_processing` each worker process prints its own line (tagged with its pid, no ETA).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

from apache_beam.metrics import Metrics

from transforms.run.cli import format_duration

NAMESPACE = "entityforge"
_ENV = "ENTITYFORGE_PROGRESS"  # "<interval>|<label>|<launcher pid>|<counter>=<expected>"
# The counters a progress line shows: records read, embedded, searched, kept, written.
_SHOWN_SUFFIXES = ("_read", "_embedded", "_searched", "_decoded", "_kept", "_dropped", "_refined", "_proposing", "_sent")
_SHOWN_PREFIXES = ("written_", "verdict_")
_MAX_SHOWN = 6

INTERVAL = 30.0  # seconds; set from --progress_interval by transforms.run.options.parse
_lock = threading.Lock()
_tally: dict[str, int] = {}
_reporter: Optional[_Reporter] = None


class _Counter:
    """Beam's counter plus this process's tally (when progress is on)."""

    __slots__ = ("name", "beam")

    def __init__(self, name: str):
        self.name = name
        self.beam = Metrics.counter(NAMESPACE, name)

    def inc(self, n: int = 1) -> None:
        self.beam.inc(n)
        if _ENV in os.environ:
            tick(self.name, n)


def counter(name: str) -> _Counter:
    return _Counter(name)


def tick(name: str, n: int = 1) -> None:
    with _lock:
        _tally[name] = _tally.get(name, 0) + n
    if _reporter is None:
        _ensure_reporter()


def shown(name: str) -> bool:
    return not name.startswith(("files_", "shuffle_")) and (name.endswith(_SHOWN_SUFFIXES) or name.startswith(_SHOWN_PREFIXES)) \
        and "reject" not in name


def _rate(r: float) -> str:
    return f"{r:,.0f}" if r >= 10 else f"{r:.1f}"


def progress_line(label: str, elapsed: float, counts: dict[str, int], expected: Optional[tuple[str, int]] = None) -> str:
    names = sorted((k for k in counts if shown(k)), key=lambda k: (-counts[k], k))[:_MAX_SHOWN]
    if expected and expected[0] in counts and expected[0] not in names:
        names = [expected[0], *names[: _MAX_SHOWN - 1]]
    parts = [f"{k} {counts[k]:,} ({_rate(counts[k] / max(elapsed, 1e-9))}/s)" for k in names]
    if expected:
        name, total = expected
        done = counts.get(name, 0)
        if total > 0 and done > 0:
            share = min(1.0, done / total)
            parts.append(f"{100 * share:.0f}% of {total:,} {name}, ETA {format_duration(elapsed * (1 - share) / share)}")
    return f"[{label} {format_duration(elapsed)}] " + (" · ".join(parts) if parts else "starting")


class _Reporter(threading.Thread):
    def __init__(self, interval: float, label: str, expected: Optional[tuple[str, int]], stream=None):
        super().__init__(daemon=True, name="entityforge-progress")
        self.interval = interval
        self.label = label
        self.expected = expected
        self.started = time.monotonic()
        self.stream = stream or sys.stderr
        self.stop_event = threading.Event()
        self.last: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.report()

    def report(self) -> None:
        with _lock:
            counts = dict(_tally)
        if counts == self.last:
            return
        self.last = counts
        print(progress_line(self.label, time.monotonic() - self.started, counts, self.expected), file=self.stream, flush=True)


def _parse_env() -> Optional[tuple[float, str, int, Optional[tuple[str, int]]]]:
    raw = os.environ.get(_ENV)
    if not raw:
        return None
    try:
        interval, label, pid, expected = raw.split("|", 3)
        exp = None
        if expected:
            name, _, total = expected.rpartition("=")
            exp = (name, int(total))
        return float(interval), label, int(pid), exp
    except ValueError:
        return None


def _ensure_reporter() -> None:
    """Start this process's reporter (a worker process of the multi-process runner starts
    its own on its first count)."""
    global _reporter
    parsed = _parse_env()
    if parsed is None:
        return
    interval, label, pid, expected = parsed
    with _lock:
        if _reporter is not None or interval <= 0:
            return
        if pid != os.getpid():
            label, expected = f"{label} worker {os.getpid()}", None
        _reporter = _Reporter(interval, label, expected)
        _reporter.start()


class Progress:
    """`with Progress(label, interval, expected):` around a local pipeline run."""

    def __init__(self, label: str, interval: float, expected: Optional[tuple[str, int]] = None):
        self.label = label
        self.interval = interval
        self.expected = expected

    def __enter__(self):
        global _reporter
        if self.interval <= 0:
            return self
        with _lock:
            _tally.clear()
        exp = f"{self.expected[0]}={self.expected[1]}" if self.expected else ""
        os.environ[_ENV] = f"{self.interval}|{self.label}|{os.getpid()}|{exp}"
        _reporter = None
        _ensure_reporter()
        return self

    def __exit__(self, *exc):
        global _reporter
        os.environ.pop(_ENV, None)
        if _reporter is not None:
            _reporter.stop_event.set()
            _reporter.join(timeout=5)
            _reporter = None
        with _lock:
            _tally.clear()
        return False
