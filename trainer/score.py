"""OVEN scoring, as the official `oven_eval` does it, plus the coverage check it lacks.

    python -m trainer.score --reference oven_entity_val.jsonl --predictions predictions.jsonl \\
        [--output metrics.json] [--allow_partial]

Reference: OVEN annotation JSON lines (`data_id`, `entity_id`, `data_split`, ...).
Predictions: JSON lines `{"data_id", "pred_entity_id"}`.
Per `data_split`, top-1 exact-QID accuracy in percent, rounded to 2 decimals; a split whose
name contains `_seen` is seen, `_unseen` unseen; `query*` splits make the query score and
`entity*` splits the entity score, each the harmonic mean of its seen and unseen accuracies
(a 0 replaced by 1e-12, as the official script does); final = harmonic mean of query and
entity. A split absent from the reference is left out of the metrics, not reported as 0.
The official script silently skips data without a prediction; here the run fails and names
how many are missing, unless --allow_partial (then a missing prediction counts as wrong).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Optional

from transforms.run.cli import Parser

EPS = 1e-12


class ScoreError(ValueError):
    pass


def harmonic_mean(a: float, b: float) -> float:
    a, b = (a or EPS), (b or EPS)
    return 2 * a * b / (a + b)


def _read_jsonl(path: str, what: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ScoreError(f"{what} {path}: invalid JSON in line {n}: {e}") from e
    return rows


def score(reference: list[dict], predictions: list[dict], allow_partial: bool = False, field: str = "pred_entity_id") -> dict:
    """`field` names the prediction column (trainer.predict also writes top_beam_entity_id
    and first_valid_entity_id). A null prediction (no image, no valid beam) is missing."""
    preds: dict[str, str] = {}
    for p in predictions:
        if "data_id" not in p or field not in p:
            raise ScoreError(f"a prediction lacks data_id or {field}: {json.dumps(p)[:200]}")
        if p[field] is None:
            continue
        key = str(p["data_id"])
        if key in preds and preds[key] != p[field]:
            raise ScoreError(f"two different predictions for data_id {key}")
        preds[key] = p[field]
    per_split = defaultdict(lambda: [0, 0])  # split -> [correct, total]
    missing = 0
    ref_ids = set()
    for n_line, r in enumerate(reference, start=1):
        lacking = [k for k in ("data_id", "entity_id", "data_split") if k not in r]
        if lacking:
            raise ScoreError(f"reference example {n_line} lacks {', '.join(lacking)}")
        key = str(r["data_id"])
        ref_ids.add(key)
        split = r["data_split"]
        per_split[split][1] += 1
        if key not in preds:
            missing += 1
            continue
        if preds[key] == r["entity_id"]:
            per_split[split][0] += 1
    n = len(ref_ids)
    coverage = round(100.0 * (n - missing) / n, 2) if n else 0.0
    if missing and not allow_partial:
        raise ScoreError(
            f"{missing} of {n} reference examples have no prediction (coverage {coverage}%); "
            "pass --allow_partial to score them as wrong"
        )
    splits = {s: round(100.0 * c / t, 2) for s, (c, t) in sorted(per_split.items())}
    metrics: dict = {"splits": splits, "coverage": coverage, "extra_predictions": len(set(preds) - ref_ids)}
    for task in ("query", "entity"):
        for side in ("seen", "unseen"):
            rows = [(c, t) for s, (c, t) in per_split.items() if s.startswith(task) and f"_{side}" in s]
            if rows:
                metrics[f"{task}_{side}"] = round(100.0 * sum(c for c, _ in rows) / sum(t for _, t in rows), 2)
        if f"{task}_seen" in metrics and f"{task}_unseen" in metrics:
            metrics[task] = round(harmonic_mean(metrics[f"{task}_seen"], metrics[f"{task}_unseen"]), 2)
    if "query" in metrics and "entity" in metrics:
        metrics["final"] = round(harmonic_mean(metrics["query"], metrics["entity"]), 2)
    return metrics


def format_table(m: dict) -> str:
    lines = ["split                          accuracy"]
    lines += [f"  {s:<28} {v:8.2f}" for s, v in m["splits"].items()]
    for k in ("query_seen", "query_unseen", "query", "entity_seen", "entity_unseen", "entity", "final", "coverage"):
        if k in m:
            lines.append(f"{k:<30} {m[k]:8.2f}")
    return "\n".join(lines)


def build_parser() -> Parser:
    ap = Parser("trainer.score", __doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="OVEN annotation JSON lines with the true entity_id")
    ap.add_argument("--predictions", required=True, help="JSON lines with data_id and the predicted entity id")
    ap.add_argument("--output", default=None, help="write the metrics as JSON here")
    ap.add_argument("--allow_partial", action="store_true", help="score missing predictions as wrong")
    ap.add_argument(
        "--prediction_field", default="pred_entity_id",
        help="prediction column to score, e.g. top_beam_entity_id for GER's top-beam accuracy",
    )
    return ap


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        m = score(_read_jsonl(args.reference, "--reference"), _read_jsonl(args.predictions, "--predictions"), args.allow_partial, args.prediction_field)
    except (ScoreError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(format_table(m))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(m, f, indent=2, sort_keys=True)
    return m


if __name__ == "__main__":
    main()
