"""Compare two refine runs of the same input, sample by sample.

    python -m pipelines.compare_runs out/rew_strong out/rew_cheap --output out/compare

Joins the two outputs by sample key: the outcome confusion matrix (correct, corrected,
not_an_entity, ungrounded, failed, absent), agreement, Cohen's kappa, label agreement
(the same QID where both kept the sample), agreement by retrieval-score bucket and by
grounding method, each run's rejected share, rationale and QA lengths, tokens and dollars.
Writes `comparison.json`, a card (`README.md` with tables and plots) and
`disagreements.html` (the samples the runs disagree on, side by side). The workflow: run
the strong model and a cheaper path (one request, a smaller image, a cascade) on the same
~2,000 samples, compare, then decide which to pay for on the whole corpus.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from transforms.errors import UsageError
from transforms.run.cli import Parser, exit_code


def build_parser() -> Parser:
    p = Parser("pipelines.compare_runs", __doc__.split("\n\n")[0])
    p.add_argument("a", help="a refine --output folder (local or gs://): run A, e.g. the strong model")
    p.add_argument("b", help="another refine --output folder of the same input: run B, e.g. the cheaper path")
    p.add_argument("--output", required=True, help="folder for comparison.json, README.md and disagreements.html")
    return p


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from transforms.report.compare import compare, write_comparison

    args = build_parser().parse_args(argv)
    if args.a.rstrip("/") == args.b.rstrip("/"):
        raise UsageError("give two different refine outputs to compare (A and B are the same folder)")
    result = compare(args.a, args.b)
    made = write_comparison(args.output, result)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    print(f"{result['samples']} samples: agreement {pct(result['agreement'])} (same outcome {pct(result['outcome_agreement'])}), "
          f"kappa {'-' if result['kappa'] is None else format(result['kappa'], '.3f')}, same entity where both kept "
          f"{pct(result['label_agreement']['same_qid'])}; {len(result['disagreements'])} disagreements")
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"card: {made['card']}   disagreements: {made['viewer']}   figures: {made['comparison']}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    return exit_code(run, argv)


if __name__ == "__main__":
    sys.exit(main())
