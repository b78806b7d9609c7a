"""Command-line parsing shared by the pipelines.

Each pipeline declares its own flags on an `argparse` parser; everything else goes to Beam's
`PipelineOptions`. Unlike `PipelineOptions(argv)` alone, which logs and drops a flag it does
not know, an unknown or misspelt flag is an error here, naming the flag.

Our flags are not declared as `PipelineOptions` subclasses on purpose: Beam builds one
parser from every subclass in the process, so two pipelines that both declare
`--text_model` could not be imported together.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from apache_beam.options import pipeline_options as po

from transforms.io.writers import SHARD_FORMATS
from transforms.run.cli import Parser, cli_main, positive, unrecognized  # noqa: F401 - cli_main, positive: the pipelines import them from here


def new_parser(description: str, module: str = "") -> Parser:
    """The parser of a Beam pipeline command (its --help lists Beam's pass-through options)."""
    p = Parser(module or "pipelines", description, beam=True)
    p.add_argument("--progress_interval", type=float, default=30.0,
                   help="seconds between progress lines on stderr in local runs (records/s, ETA when known); 0 = none")
    return p


def _beam_parser() -> argparse.ArgumentParser:
    parser = po._BeamArgumentParser(allow_abbrev=False)  # noqa: SLF001 - Beam's own parser
    seen = {}

    def walk(cls):
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("apache_beam") and str(sub) not in seen:
                seen[str(sub)] = sub
                walk(sub)

    walk(po.PipelineOptions)
    for cls in seen.values():
        try:
            cls._add_argparse_args(parser)  # noqa: SLF001
        except argparse.ArgumentError:
            pass
    return parser


DASK_RUNNER = "transforms.run.dask_runner.DaskRunner"


def runner_of(argv: Sequence[str]) -> str:
    """The value of --runner in `argv` ("" when not given)."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--runner" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--runner="):
            return a.split("=", 1)[1]
    return ""


def _is_dask(runner: str) -> bool:
    return runner.rsplit(".", 1)[-1].lower() in ("daskrunner", "dask")


def _with_runner(argv: list[str], runner: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--runner" and i + 1 < len(argv):
            skip = True
            continue
        if not a.startswith("--runner="):
            out.append(a)
    return [*out, f"--runner={runner}"]


def _dask_help(parser: argparse.ArgumentParser) -> None:
    """`--runner DaskRunner --help`: the Dask options (Beam's DaskOptions, parsed by Beam)
    in a group of their own, with what they do under this runner."""
    group = parser.add_argument_group("Dask runner options (--runner DaskRunner; docs/dask.md)")
    for flag, meta, text in (
        ("--dask_client_address", "ADDRESS", "the scheduler, e.g. tcp://10.0.0.5:8786 (default: a LocalCluster of "
                                             "this machine's cores, closed when the run ends)"),
        ("--dask_scheduler_file", "PATH", "a scheduler file (dask-jobqueue, `dask scheduler --scheduler-file`) "
                                          "instead of an address"),
        ("--dask_connection_timeout", "SECONDS", "how long to wait for the scheduler (default: Dask's)"),
        ("--dask_client_name", "NAME", "the client's name in the scheduler's logs and dashboard"),
        ("--dask_connection_limit", "N", "open connections the client keeps (default: 512)"),
        ("--dask_npartitions", "N", "partitions of Create, Reshuffle and GroupByKey (default: 2 per worker thread "
                                    "of the cluster); file sources split by size"),
    ):
        group.add_argument(flag, metavar=meta, default=argparse.SUPPRESS, help=text)


def split_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags -> Namespace, and the rest, which must all be Beam pipeline options: an
    unknown or misspelt flag is an error naming it (and the flag it most likely meant).
    With `--runner DaskRunner` the Dask options are known (and listed by --help)."""
    argv = list(argv)
    if _is_dask(runner_of(argv)):
        import transforms.run.dask_runner  # noqa: F401 - registers Beam's DaskOptions

        if "--help" in argv or "-h" in argv:
            _dask_help(parser)
    args, rest = parser.parse_known_args(argv)
    beam = _beam_parser()
    _, unknown = beam.parse_known_args(rest)
    if unknown:
        ours = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]  # noqa: SLF001
        theirs = [s for a in beam._actions for s in a.option_strings if s.startswith("--")]  # noqa: SLF001
        parser.error(
            unrecognized(unknown, ours + theirs)
            + " (neither a flag of this command nor a Beam pipeline option; see --help)"
        )
    return args, rest


def parse(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
) -> tuple[argparse.Namespace, po.PipelineOptions]:
    """Our flags -> Namespace, the rest -> PipelineOptions; unknown flags are an error."""
    args, rest = split_args(parser, list(sys.argv[1:] if argv is None else argv))
    if not any(a == "--runner" or a.startswith("--runner=") for a in rest):
        # Beam's default runner tries to download the Prism binary first; be explicit.
        rest.append("--runner=DirectRunner")
    elif _is_dask(runner_of(rest)):
        # Beam does not list its DaskRunner among the runners it knows by name.
        rest = _with_runner(rest, DASK_RUNNER)
    if hasattr(args, "progress_interval"):
        from transforms.run import progress

        progress.INTERVAL = max(0.0, float(args.progress_interval))
    return args, po.PipelineOptions(rest)


# Flag groups: a flag that several commands take is declared once, with one help text.

def add_output(p: argparse.ArgumentParser, help: str = "output directory (local or gs://)") -> None:
    p.add_argument("--output", required=True, help=help)


def add_threads(p: argparse.ArgumentParser, what: str = "torch/faiss threads") -> None:
    p.add_argument("--threads", type=int, default=0, help=f"{what}; 0 = cores / processes")


def add_shards(p: argparse.ArgumentParser, formats: Optional[str] = None, shuffle_note: bool = True) -> None:
    """--num_shards, and --formats (a comma list of shard formats) when `formats` gives its default."""
    if formats is not None:
        p.add_argument("--formats", default=formats, help=f"comma list of {', '.join(SHARD_FORMATS)}")
    p.add_argument("--num_shards", type=int, default=0,
                   help="output shards; 0 = runner decides" + (" (no shuffle)" if shuffle_note else ""))


def add_text_encoder(p: argparse.ArgumentParser, chunk_flag: str = "--embed_chunk", what: str = "texts") -> None:
    """How the text encoder runs: texts per call (`chunk_flag`), --embed_tokens_per_pass, --device."""
    p.add_argument(chunk_flag, type=int, default=2048,
                   help=f"{what} handed to the text encoder at once; it groups them by token length")
    p.add_argument("--embed_tokens_per_pass", type=int, default=0,
                   help="padded tokens per encoder forward pass (0: 2048 on CPU, 65536 on a GPU)")
    p.add_argument("--device", default="cpu", help="torch device of the text encoder")


def add_unfinished_input(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow_unfinished_input",
        action="store_true",
        help="read shards of ours even when their folder has no manifest.json or does not match it "
        "(the run that wrote them did not finish); off by default, so a killed run is not read as whole",
    )


def add_share(p: argparse.ArgumentParser, flag: str, what: str, auto: str = "when the runner starts more than one process per machine") -> None:
    """An auto|yes|no choice of holding something once per machine for every SDK process."""
    p.add_argument(flag, choices=("auto", "yes", "no"), default="auto", help=f"{what} (auto: {auto})")


def shared(choice: str, options, auto: Optional[bool] = None) -> bool:
    """An `add_share` flag's value: yes / no, or for auto `auto` when given, else whether the
    runner starts more than one SDK process per machine."""
    if choice in ("yes", "no"):
        return choice == "yes"
    if auto is not None:
        return auto
    from transforms.run.job import worker_processes

    return worker_processes(options) != 1
