"""Command-line conventions shared by every command (pipelines and trainer), without
importing Beam: usage `python -m MODULE`, defaults shown in --help, no abbreviated flags,
and a misspelt flag answered with the flag that was meant."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from transforms.errors import AccountingError, NoSpaceError, UsageError, no_space, worker_lost

BEAM_EPILOG = (
    "Beam pipeline options pass through: --runner (DirectRunner unless given; DataflowRunner on Google Cloud), "
    "--direct_num_workers N --direct_running_mode multi_processing (local processes), "
    "DaskRunner (a Dask cluster: --dask_client_address HOST:PORT; --runner DaskRunner --help lists its options), "
    "--project, --region, "
    "--temp_location, --max_num_workers, --machine_type, --sdk_container_image, ... (any option of "
    "apache_beam.options.pipeline_options)."
)


def suggest(flag: str, known: Sequence[str]) -> str:
    """`flag` (or `--flag=value`), with the known flag it most likely meant."""
    name = flag.split("=", 1)[0]
    if not name.startswith("--"):
        return flag
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.7)
    return f"{flag} (did you mean {close[0]}?)" if close else flag


def unrecognized(unknown: Sequence[str], known: Sequence[str]) -> str:
    return "unrecognized arguments: " + " ".join(suggest(u, known) for u in unknown)


class Parser(argparse.ArgumentParser):
    """argparse with the conventions of every command here: usage `python -m MODULE`,
    defaults shown in --help, no abbreviated flags, and a misspelt flag answered with the
    flag that was meant (`--treshold` -> `--threshold`)."""

    def __init__(self, module: str, description: str, beam: bool = False, **kw):
        super().__init__(
            prog=f"python -m {module}",
            description=description,
            allow_abbrev=False,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            epilog=BEAM_EPILOG if beam else kw.pop("epilog", None),
            **kw,
        )

    def flags(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def parse_args(self, args=None, namespace=None):  # noqa: D102 - argparse's, with suggestions
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized(extras, self.flags()))
        return ns


def format_duration(seconds: float) -> str:
    """45s, 3m05s, 2h07m: durations in progress lines and ETAs."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def positive(flag: str, value, minimum=1):
    if value is None or value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")
    return value


def exit_code(run: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> int:
    """`run(argv)` as a command's exit status: 0; 2 for misuse (UsageError), 3 for counts
    that do not add up (AccountingError) or a worker process lost mid-run (the output is
    incomplete), and 1 for a full disk (one line naming the path and how to go on), with
    the message on stderr as the last line."""
    try:
        run(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AccountingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        lost = worker_lost(e)
        if lost:
            sys.stderr.flush()
            print(f"error: {lost}", file=sys.stderr, flush=True)
            return 3
        full = no_space(e)
        if not full:
            raise
        if not isinstance(full, NoSpaceError):
            args = list(sys.argv[1:] if argv is None else argv)
            path = getattr(full, "filename", None) if isinstance(full, OSError) else _filename_in(str(e))
            path = str(path or _flag_value(args, "--output") or "the output")
            full = NoSpaceError(path, _flag_holding(args, path))
        sys.stderr.flush()
        print(f"error: {full}", file=sys.stderr, flush=True)
        return 1
    return 0


def _filename_in(text: str) -> Optional[str]:
    """The file an OSError named, from its text (Beam re-raises a worker's error as text:
    `OSError: [Errno 28] No space left on device: '/data/out/x.parquet'`)."""
    import re

    m = re.search(r"No space left on device: '([^']+)'", text)
    return m.group(1) if m else None


def _flag_holding(argv: list[str], path: str) -> str:
    """The flag whose folder holds `path` (the longest such value: `--cache` for a response
    cache, `--output` for shards), so the one line names what to change; `--output` when
    no flag's value holds it."""
    best, flag = -1, "--output"
    target = path.rstrip("/")
    for i, a in enumerate(argv[:-1]):
        if not a.startswith("--") or "=" in a:
            continue
        value = argv[i + 1].rstrip("/")
        if value and (target == value or target.startswith(value + "/")) and len(value) > best:
            best, flag = len(value), a
    for a in argv:
        if a.startswith("--") and "=" in a:
            name, value = a.split("=", 1)
            value = value.rstrip("/")
            if value and (target == value or target.startswith(value + "/")) and len(value) > best:
                best, flag = len(value), name
    return flag


def _flag_value(argv: list[str], flag: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def cli_main(run: Callable[[Optional[Sequence[str]]], object]) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from transforms.run.secrets import install_log_redaction

    install_log_redaction()
    code = exit_code(run)
    if code:
        sys.exit(code)
