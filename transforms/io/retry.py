"""Retrying errors of the environment where a file is read: `retry_stream` (a generator over
one file or unit, retried while nothing was yielded), `read_guarded` (the shape of every file
reader: data errors to rejects, environment errors raised), `retry_call` (one call).
Which errors are data and which are the environment: `formats.files.is_data_error`."""

from __future__ import annotations

import logging

from transforms.run.progress import counter

log = logging.getLogger(__name__)

# Retries of environment errors inside a DoFn, before the runner's own bundle retries.
IO_RETRIES = 4
IO_RETRY_DELAY_S = 0.5


def retry_stream(make, what: str, retries: int = IO_RETRIES, delay_s: float = IO_RETRY_DELAY_S):
    """Yield from `make()` (a generator over one file or unit), retrying errors of the
    environment (see `formats.files.is_data_error`) with exponential backoff as long as
    nothing was yielded yet. After the first item, or when retries run out, the error is
    raised: the runner then retries the whole bundle (its outputs are discarded, so
    nothing is emitted twice). Data errors are raised at once, for the caller to reject.
    Counter `io_retries` counts the retries."""
    import time

    from apache_beam.utils.retry import FuzzedExponentialIntervals

    from transforms.formats.files import is_data_error

    delays = iter(FuzzedExponentialIntervals(delay_s, retries, max_delay_secs=30))
    while True:
        started = False
        try:
            for item in make():
                started = True
                yield item
            return
        except Exception as e:  # noqa: BLE001 - classified below
            # A full disk does not clear in seconds: raised at once, for the one-line message.
            if started or is_data_error(e) or _disk_full(e):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            counter("io_retries").inc()
            log.warning("%s: %s: %s; retrying in %.1f s", what, type(e).__name__, e, delay)
            time.sleep(delay)


def _disk_full(e: BaseException) -> bool:
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def read_guarded(make, what: str, on_data_error):
    """`retry_stream(make)`, with a data error handed to `on_data_error(e)` (a generator of
    rejects) and an environment error raised: the shape of every file reader's process."""
    from transforms.formats.files import is_data_error

    try:
        yield from retry_stream(make, what)
    except Exception as e:  # noqa: BLE001 - classified: data -> reject, environment -> raise
        if not is_data_error(e):
            raise
        yield from on_data_error(e)


def retry_call(fn, what: str):
    """`fn()` with errors of the environment retried (see `retry_stream`)."""
    (result,) = retry_stream(lambda: iter([fn()]), what)
    return result
