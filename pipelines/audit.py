"""A person's audit of an output's labels, in the browser.

    python -m pipelines.audit out/rew --sample 300 --seed 0
    python -m pipelines.audit out/rew --judgments judgments-ann.jsonl[,judgments-bob.jsonl]

The first form writes `out/rew/audit/audit.html`: a stratified, seeded sample of the records
(kept ones by verdict, grounding method and retrieval-score bucket; rejected ones by stage
and reason), shown one at a time with its image, caption, label and the LLM's reason. Keys
judge it (r right, w wrong, u unsure; for a reject d rightly dropped, k wrongly dropped);
judgments stay in the page (the browser's local storage) and Export downloads them as JSON
lines. The second form reads those files back and reports the precision per verdict,
rejection reason, grounding method and score bucket, with Wilson 95 % intervals,
re-weighted to the whole output by the strata weights (`audit/audit_sample.json`); several
reviewers' files combine (majority per record) and their agreement is shown. The results go
to `audit/results.json` and an "Audit" section of the output's card.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from transforms.errors import UsageError
from transforms.run.cli import Parser, exit_code


def build_parser() -> Parser:
    p = Parser("pipelines.audit", __doc__.split("\n\n")[0])
    p.add_argument("dir", help="an output folder (refine's REW shards, or any with Parquet shards and rejects)")
    p.add_argument("--sample", type=int, default=300, help="records to audit")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--judgments", default=None, help="comma list of exported judgment files: report instead of sampling")
    return p


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from transforms.formats.files import write_json
    from transforms.report.audit import AUDIT_DIR, evaluate, make_audit
    from transforms.report.card import write_card

    args = build_parser().parse_args(argv)
    out = args.dir.rstrip("/")
    if args.judgments is None:
        if args.sample < 1:
            raise UsageError(f"--sample must be >= 1, got {args.sample}")
        made = make_audit(out, args.sample, args.seed)
        print(f"audit: {made['records']} records in {made['strata']} strata ({made['with_image']} with their image): "
              f"open {made['page']} in a browser; judgments export as JSON lines, then: "
              f"python -m pipelines.audit {out} --judgments FILE")
        return made
    paths = [p for p in args.judgments.split(",") if p]
    results = evaluate(out, paths)
    write_json(f"{out}/{AUDIT_DIR}/results.json", results)
    card = write_card(out)
    for group, values in results["precision"].items():
        for name, v in values.items():
            if v:
                print(f"{group:<17} {name:<40} {100 * v['precision']:5.1f} %  [{100 * v['low']:.1f}, {100 * v['high']:.1f}]  "
                      f"({v['judged']} judged)")
    for a in results["agreement"]:
        print(f"agreement {' / '.join(a['reviewers'])}: {100 * a['agreement']:.1f} % of {a['records']} records, kappa {a['kappa']}")
    print(f"results: {out}/{AUDIT_DIR}/results.json   card: {card['card']}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    return exit_code(run, argv)


if __name__ == "__main__":
    sys.exit(main())
