"""The errors a command reports to its user, without importing Beam (the trainer and the
format code raise them too): `cli_main` prints them without a traceback."""

from __future__ import annotations


class UsageError(ValueError):
    """A misuse the user can fix (a wrong flag value, a missing file); `cli_main` prints it
    without a traceback and exits with status 2."""


class AccountingError(RuntimeError):
    """A count identity of a run does not hold: records were lost or repeated. The
    command exits non-zero (3) with the stage and the gap."""
