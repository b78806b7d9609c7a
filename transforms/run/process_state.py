"""State a worker process keeps between bundles that must not outlive a run.

On Dataflow and Beam's local runners a worker process lives for one job. A Dask worker
lives on: the next run on the cluster finds what the last one left in its process (a
response cache's file listing, buffered writes). A module that keeps such state registers
a reset here; the Dask runner calls `reset_all()` on every worker when a run ends."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_RESETS: list[Callable[[], None]] = []
_LOCK = threading.Lock()


def on_run_end(reset: Callable[[], None]) -> Callable[[], None]:
    """Register `reset` (once), to be called when a run ends in this process."""
    with _LOCK:
        if reset not in _RESETS:
            _RESETS.append(reset)
    return reset


def reset_all() -> int:
    """Call every registered reset; a failing one is logged, the others still run."""
    with _LOCK:
        resets = list(_RESETS)
    for reset in resets:
        try:
            reset()
        except Exception as e:  # noqa: BLE001 - one module's cleanup must not stop the others'
            log.warning("end-of-run reset %s failed: %s", getattr(reset, "__qualname__", reset), e)
    return len(resets)
