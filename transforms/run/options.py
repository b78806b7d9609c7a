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


def split_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags -> Namespace, and the rest, which must all be Beam pipeline options: an
    unknown or misspelt flag is an error naming it (and the flag it most likely meant)."""
    args, rest = parser.parse_known_args(list(argv))
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
    if hasattr(args, "progress_interval"):
        from transforms.run import progress

        progress.INTERVAL = max(0.0, float(args.progress_interval))
    return args, po.PipelineOptions(rest)
