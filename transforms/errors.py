"""The errors a command reports to its user, without importing Beam (the trainer and the
format code raise them too): `cli_main` prints them without a traceback."""

from __future__ import annotations


class UsageError(ValueError):
    """A misuse the user can fix (a wrong flag value, a missing file); `cli_main` prints it
    without a traceback and exits with status 2."""


class AccountingError(RuntimeError):
    """A count identity of a run does not hold: records were lost or repeated. The
    command exits non-zero (3) with the stage and the gap."""


class NoSpaceError(OSError):
    """The disk (or quota) filled while a run wrote its output: an error of the
    environment, not of the data. `cli_main` prints one line naming the path and how to go
    on, and exits with status 1; nothing claims the run finished (no manifest)."""

    def __init__(self, path: str, flag: str = "--output"):
        super().__init__(28, f"no space left on device writing {path}: free space or choose another {flag}, "
                             "then run the same command again")
        self.path, self.flag = path, flag

    def __str__(self) -> str:
        return self.strerror


_NO_SPACE_TEXT = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")


def no_space(exc: BaseException):
    """The OSError (ENOSPC / EDQUOT) behind `exc`, or a text-only trace of one (Beam re-raises
    a worker's OSError as a RuntimeError carrying only its text); None when the disk did not
    fill. Returns the OSError when there is one (its `filename` names the file), else True."""
    import errno

    seen = set()
    stack = [exc]
    found = None
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NoSpaceError):
            return e
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if found is None and any(t in str(e) for t in _NO_SPACE_TEXT):
            found = True
        stack += [e.__cause__, e.__context__]
    return found


# What Beam's portable runner raises when an SDK worker process dies under it (killed,
# out of memory): its data channel to the worker closes before the bundle's end.
_WORKER_LOST_TEXT = ("Channel closed prematurely",)


def worker_lost(exc: BaseException):
    """A one-line account of a run that failed because a worker process of Beam's
    multi-process runner was lost, or None when that is not what happened."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__name__ == "KilledWorker":
            return (f"Dask gave up on a task after the workers running it died ({e}): the output is incomplete and "
                    "no manifest claims it; look for the workers' cause of death (memory: the worker's log or "
                    "`dmesg`), then run the same command again")
        if any(t in str(e) for t in _WORKER_LOST_TEXT):
            return ("a worker process of the run was lost mid-run (Beam: channel closed prematurely), so some bundles "
                    "never finished: the output is incomplete and no manifest claims it; run the same command again "
                    "(it starts the output clean; refine's cache keeps the answers already paid for)")
        stack += [e.__cause__, e.__context__]
    return None
