"""Run the whole chain from a recipe, like make: each stage only when its output is not up
to date, then everything downstream of it.

    python -m pipelines.run recipes/demo.yaml --output out [--data DIR]
        [--from STAGE] [--until STAGE] [--force STAGE[,STAGE]] [--set STAGE.FLAG=VALUE] [--dry_run]
        [--estimate_only --entities N --captions N]
        [Beam options for every Beam stage: --runner DataflowRunner --project ... ]

A recipe (YAML) lists the stages, each one of our commands and its flags (or another
program and the files it makes); a stage's input flags default to the outputs of the
stages that make them. A stage is skipped when its output's manifest exists with an ok
count check, the options it recorded equal the recipe's and its inputs are the ones it
read (their manifests' fingerprints). A killed or failed chain, run again, finishes from
where it stopped. `--dry_run` prints every stage's full command and whether it would run
or be skipped, and why. The chain writes `recipe.yaml`, `chain.json` and a summary
`README.md` into --output. Recipes shipped: recipes/*.yaml.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from transforms.run.cli import BEAM_EPILOG, Parser, exit_code


def build_parser() -> Parser:
    p = Parser("pipelines.run", __doc__.split("\n\n")[0], epilog=BEAM_EPILOG)
    p.add_argument("recipe", help="a recipe YAML file (recipes/demo.yaml, recipes/entity_laion.yaml, ...)")
    p.add_argument("--output", required=True, help="the chain's output root: each stage writes ${output}/<stage name>")
    p.add_argument("--data", default=None, help="the recipe's ${data} (default: its `data:` entry)")
    p.add_argument("--from", dest="start", default=None, metavar="STAGE", help="run from this stage on (earlier ones are left as they are)")
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FLAG=VALUE",
                   help="change one flag of one stage without editing the recipe (repeatable), e.g. --set candidates.k=20")
    p.add_argument("--force", default="", metavar="STAGE[,STAGE]", help="run these stages (and so everything downstream) even when up to date")
    p.add_argument("--dry_run", nargs="?", const="true", default=None, choices=("true", "True", "false", "False"),
                   help="print each stage's full command and whether it would run or be skipped, and why; run nothing. "
                        "With --runner DataflowRunner, also build every Beam stage's Dataflow job without submitting it "
                        "(Beam's --dry_run=True)")
    p.add_argument("--estimate_only", action="store_true",
                   help="print the planner's figures (python -m pipelines.plan --recipe) for this recipe and the sizes below; run nothing")
    p.add_argument("--entities", type=float, default=None, help="--estimate_only: catalog size (OVEN/Wiki6M: 6063945)")
    p.add_argument("--captions", type=float, default=None, help="--estimate_only: caption corpus size (LAION-2B-en: 2.3e9)")
    p.add_argument("--images", type=float, default=None, help="--estimate_only: selected images (default: the planner's estimate)")
    return p


def split_beam(parser: Parser, argv: Sequence[str]):
    """Our flags, and the rest: Beam pipeline options for every Beam stage (checked here, so
    a misspelt option fails before the first stage runs)."""
    from transforms.run.options import split_args

    return split_args(parser, argv)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from transforms.run import chain, recipe

    parser = build_parser()
    args, beam_args = split_beam(parser, list(sys.argv[1:] if argv is None else argv))
    if args.estimate_only:
        from pipelines import plan
        from transforms.errors import UsageError

        if args.entities is None or args.captions is None:
            raise UsageError("--estimate_only needs the input sizes: --entities N --captions N [--images N]")
        sizes = ["--entities", str(args.entities), "--captions", str(args.captions)]
        sizes += ["--images", str(args.images)] if args.images else []
        return plan.run(["--recipe", args.recipe, *sizes])
    r = recipe.load(args.recipe, args.output, args.data, recipe.parse_set(args.overrides))
    force = {s for s in args.force.split(",") if s}
    decisions = chain.plan(r, force, args.start, args.until)
    if args.dry_run in ("true", "True"):
        chain.dry_run(decisions, beam_args)
        built = chain.build_jobs(decisions, beam_args) if chain.is_dataflow(beam_args) else {}
        return {"dry_run": True, "jobs": built,
                "stages": [{"name": d.stage.name, "run": d.run, "reason": d.reason,
                            "command": d.stage.command_line(beam_args)} for d in decisions]}
    chain.execute(r, decisions, beam_args)
    summary = chain.write_summary(r, decisions, beam_args)
    ran = [d.stage.name for d in decisions if d.status == "ran"]
    print(f"chain {r.name}: {len(ran)} stage(s) ran ({', '.join(ran) or 'none'}), "
          f"{sum(d.status == 'skipped' for d in decisions)} skipped; summary: {r.output}/README.md")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    from transforms.run.chain import ChainError

    try:
        return exit_code(run, argv)
    except ChainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from transforms.run.cli import cli_main

    try:
        cli_main(run)
    except Exception as e:  # noqa: BLE001
        from transforms.run.chain import ChainError

        if not isinstance(e, ChainError):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
