"""Two REW runs of the same input, compared sample by sample (`pipelines.compare_runs`).

Each sample's outcome in a run is one of: `correct`, `corrected` (kept, with its final
QID), `not_an_entity`, `ungrounded` (rejected for that reason), `failed` (any other reject:
an invalid answer, an endpoint error, a batch that never answered) or `absent` (in neither
the run's shards nor its rejects: a run of another input, or one that did not finish).
The comparison joins the two runs by sample key and reports:

* the outcome confusion matrix (rows: run A, columns: run B), the share of samples with
  the same outcome, and Cohen's kappa over the outcomes;
* label agreement: of the samples both runs kept, the share with the same final QID;
* agreement (same outcome, and the same QID where kept) by retrieval-score bucket and by
  run A's grounding method;
* per run: the share rejected, mean rationale length and QA pairs, tokens and dollars (from
  its manifest);
* the disagreements: samples whose outcome or QID differ, side by side.

What one machine holds: the keys and a few short columns of both runs (no image bytes,
except thumbnails of the disagreements, read back for those keys only). It is meant for a
sample of a run (thousands to a few million rows), the workflow the REW docs describe.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from transforms.errors import UsageError
from transforms.formats.files import open_read, read_json
from transforms.formats.text import strip_controls

OUTCOMES = ("correct", "corrected", "not_an_entity", "ungrounded", "failed", "absent")
KEPT = ("correct", "corrected")
SCORE_EDGES = (0.4, 0.5, 0.6, 0.7)
COLUMNS = ["key", "qid", "title", "verdict", "grounding_method", "score", "caption", "candidate_qid", "candidate_title",
           "llm_entity", "verify_reason", "rationale", "qa_json", "llm_model", "escalated"]
THUMB_SIDE = 256


@dataclass
class Outcome:
    """One sample in one run."""

    outcome: str
    qid: Optional[str] = None
    title: Optional[str] = None
    reason: str = ""  # the LLM's reason (kept) or the reject's detail
    model: Optional[str] = None
    grounding: Optional[str] = None
    score: Optional[float] = None
    caption: str = ""
    rationale: Optional[str] = None
    qa_pairs: Optional[int] = None
    extra: dict = field(default_factory=dict)


def score_bucket(score: Optional[float]) -> str:
    if score is None or not isinstance(score, (int, float)) or math.isnan(score):
        return "unknown"
    lo = None
    for edge in SCORE_EDGES:
        if score < edge:
            return f"< {edge:g}" if lo is None else f"{lo:g}-{edge:g}"
        lo = edge
    return f">= {SCORE_EDGES[-1]:g}"


def _reject_outcome(r: dict) -> Outcome:
    stage, reason = r.get("stage"), r.get("reason")
    if stage == "verify" and reason == "not_an_entity":
        kind = "not_an_entity"
    elif stage == "ground" and reason == "ungrounded":
        kind = "ungrounded"
    else:
        kind = "failed"
    record = {}
    try:
        record = json.loads(r.get("record_json") or "{}")
    except ValueError:
        pass
    record = record if isinstance(record, dict) else {}
    score = record.get("score")
    return Outcome(kind, qid=record.get("qid"), title=record.get("title"), reason=f"{stage}/{reason}: {r.get('detail') or ''}",
                   caption=str(record.get("caption") or ""), score=score if isinstance(score, (int, float)) else None,
                   extra={"llm_entity": record.get("llm_entity")})


def load_run(out: str) -> tuple[dict, dict[str, Outcome]]:
    """(manifest, key -> Outcome) of a REW output folder: every kept row (Parquet shards, no
    image bytes) and every reject."""
    import pyarrow.parquet as pq

    from transforms.report.outputs import parquet_files, read_rejects

    out = out.rstrip("/")
    try:
        manifest = read_json(f"{out}/manifest.json")
    except Exception as e:  # noqa: BLE001 - missing, unreadable or not JSON alike
        raise UsageError(f"{out}: no readable manifest.json ({type(e).__name__}: {e}); give a refine --output folder") from e
    if manifest.get("kind") != "rew_shards":
        raise UsageError(f"{out} is a {manifest.get('kind')!r} output, not refine's (rew_shards): compare two refine outputs")
    files = parquet_files(out, manifest)
    if not files and manifest.get("counters", {}).get("samples_refined", 0):
        raise UsageError(f"{out} has no Parquet shards (refine --formats without parquet): run refine with parquet among --formats")
    runs: dict[str, Outcome] = {}
    for path, _ in files:
        with open_read(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(columns=cols, batch_size=65_536):
                for row in batch.to_pylist():
                    qa = None
                    try:
                        qa = len(json.loads(row.get("qa_json") or "[]"))
                    except (ValueError, TypeError):
                        pass
                    runs[row["key"]] = Outcome(
                        row.get("verdict") or "correct", qid=row.get("qid"), title=row.get("title"),
                        reason=row.get("verify_reason") or "", model=row.get("llm_model"), grounding=row.get("grounding_method"),
                        score=row.get("score"), caption=row.get("caption") or "", rationale=row.get("rationale"), qa_pairs=qa,
                        extra={"llm_entity": row.get("llm_entity"), "escalated": row.get("escalated")})
    for r in read_rejects(out, limit=10**9):
        if r.get("key") and r["key"] not in runs:
            runs[r["key"]] = _reject_outcome(r)
    return manifest, runs


def kappa(pairs: list[tuple[str, str]]) -> Optional[float]:
    """Cohen's kappa of two raters' labels; None for no pairs, 1.0 when both always agree on
    one label (no disagreement is possible by chance either)."""
    n = len(pairs)
    if not n:
        return None
    observed = sum(a == b for a, b in pairs) / n
    ca, cb = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(ca[c] * cb[c] for c in ca) / (n * n)
    if expected >= 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)


def agree(a: Outcome, b: Outcome) -> bool:
    """Same outcome, and where both kept the sample, the same final entity."""
    return a.outcome == b.outcome and (a.outcome not in KEPT or a.qid == b.qid)


def _run_figures(manifest: dict, outcomes: list[Outcome]) -> dict:
    n = len(outcomes)
    kept = [o for o in outcomes if o.outcome in KEPT]
    rationale = [len(o.rationale) for o in kept if o.rationale]
    qa = [o.qa_pairs for o in kept if o.qa_pairs is not None]
    tokens = manifest.get("tokens") or {}
    return {
        "model": manifest.get("model"), "backend": manifest.get("backend"), "rew_requests": manifest.get("rew_requests", 2),
        "samples": n, "kept": len(kept), "rejected_share": round(1 - len(kept) / n, 6) if n else 0.0,
        "mean_rationale_chars": round(sum(rationale) / len(rationale), 1) if rationale else None,
        "mean_qa_pairs": round(sum(qa) / len(qa), 2) if qa else None,
        "tokens": {"input": tokens.get("input"), "output": tokens.get("output")},
        "cost_usd": manifest.get("cost_usd"), "cost_usd_at_batch_prices": manifest.get("cost_usd_at_batch_prices"),
    }


def compare(a_dir: str, b_dir: str) -> dict:
    """Every figure of the comparison of two refine outputs, and the disagreements."""
    ma, a = load_run(a_dir)
    mb, b = load_run(b_dir)
    ins = [(m.get("inputs") or {}).get("listed") for m in (ma, mb)]
    warnings = []
    if ins[0] and ins[1] and sorted(ins[0]) != sorted(ins[1]):
        warnings.append("the two runs read different input files: samples only one of them saw count as absent in the other")
    keys = sorted(set(a) | set(b))
    absent = Outcome("absent")
    pairs = [(k, a.get(k, absent), b.get(k, absent)) for k in keys]
    for _, x, y in pairs:  # a sample one run kept carries the score and grounding of that run
        x.score = x.score if x.score is not None else y.score
        y.score = y.score if y.score is not None else x.score
    confusion = {o: {p: 0 for p in OUTCOMES} for o in OUTCOMES}
    for _, x, y in pairs:
        confusion[x.outcome][y.outcome] += 1
    used = [o for o in OUTCOMES if any(confusion[o].values()) or any(confusion[p][o] for p in OUTCOMES)]
    both_kept = [(x, y) for _, x, y in pairs if x.outcome in KEPT and y.outcome in KEPT]
    by_bucket: dict[str, list[bool]] = defaultdict(list)
    by_method: dict[str, list[bool]] = defaultdict(list)
    for _, x, y in pairs:
        same = agree(x, y)
        by_bucket[score_bucket(x.score)].append(same)
        by_method[x.grounding or x.outcome].append(same)

    def share(values: list[bool]) -> dict:
        return {"samples": len(values), "agreement": round(sum(values) / len(values), 6) if values else None}

    order = ["unknown"] + [score_bucket(e - 1e-9) for e in SCORE_EDGES] + [score_bucket(SCORE_EDGES[-1])]
    disagreements = [{"key": k, "a": x, "b": y} for k, x, y in pairs if not agree(x, y)]
    return {
        "a": a_dir, "b": b_dir, "samples": len(keys), "warnings": warnings,
        "outcomes": used,
        "confusion": {o: {p: confusion[o][p] for p in used} for o in used},
        "outcome_agreement": round(sum(x.outcome == y.outcome for _, x, y in pairs) / len(pairs), 6) if pairs else None,
        "agreement": round(sum(agree(x, y) for _, x, y in pairs) / len(pairs), 6) if pairs else None,
        "kappa": kappa([(x.outcome, y.outcome) for _, x, y in pairs]),
        "label_agreement": {"both_kept": len(both_kept),
                            "same_qid": round(sum(x.qid == y.qid for x, y in both_kept) / len(both_kept), 6) if both_kept else None},
        "by_score_bucket": {k: share(by_bucket[k]) for k in order if k in by_bucket},
        "by_grounding_method": {k: share(v) for k, v in sorted(by_method.items())},
        "runs": {"a": _run_figures(ma, list(a.values())), "b": _run_figures(mb, list(b.values()))},
        "disagreements": disagreements,
    }


# --------------------------------------------------------------------------------------
# Writing the comparison: JSON, card, side-by-side viewer
# --------------------------------------------------------------------------------------


def _thumbnails(dirs: list[str], keys: set[str]) -> dict[str, str]:
    """key -> data URL of a small JPEG, from the runs' shards, else their Parquet inputs."""
    from transforms.report.outputs import image_sources, thumbnails

    return thumbnails(image_sources(dirs), keys, THUMB_SIDE)


def _esc(v) -> str:
    return html.escape(strip_controls(str(v if v is not None else "")))


def _side(o: Outcome) -> str:
    entity = f"{_esc(o.title) or '(no title)'} <span class=q>{_esc(o.qid)}</span>" if o.qid else "(no entity)"
    extra = []
    if o.extra.get("llm_entity"):
        extra.append(f"the model wrote: {_esc(o.extra['llm_entity'])}")
    if o.extra.get("escalated"):
        extra.append("escalated")
    return (f"<div class='run'><div class='v {_esc(o.outcome)}'>{_esc(o.outcome)}</div><div>{entity}</div>"
            f"<div class=r>{_esc(o.reason)}</div><div class=m>{_esc(o.model)} {_esc('; '.join(extra))}</div></div>")


def write_viewer(path: str, result: dict, thumbs: dict[str, str]) -> None:
    """A self-contained page of the disagreements: image, caption, each run's outcome,
    entity, reason and model. Every text from the runs is escaped."""
    from apache_beam.io.filesystems import FileSystems

    rows = []
    for d in result["disagreements"]:
        a, b = d["a"], d["b"]
        img = thumbs.get(d["key"])
        pic = f"<img src='{img}' alt=''>" if img else "<div class=noimg>image in neither run</div>"
        caption = a.caption or b.caption
        rows.append(f"<tr><td>{pic}</td><td><div class=k>{_esc(d['key'])}</div><div class=c>{_esc(caption)}</div>"
                    f"<div class=s>score {_esc(a.score if a.score is not None else '?')}</div></td>"
                    f"<td>{_side(a)}</td><td>{_side(b)}</td></tr>")
    page = f"""<!doctype html><html><head><meta charset=utf-8><title>REW runs compared: disagreements</title>
<style>body{{font:14px sans-serif;margin:16px}}table{{border-collapse:collapse}}td{{border-top:1px solid #ddd;padding:8px;
vertical-align:top;max-width:360px}}img{{max-width:256px}}.v{{font-weight:bold}}.correct{{color:#2a7}}.corrected{{color:#27a}}
.not_an_entity,.ungrounded,.failed,.absent{{color:#b33}}.q,.k,.s,.m{{color:#777;font-size:12px}}.r{{font-style:italic}}</style>
</head><body><h1>{len(result['disagreements'])} disagreements of {result['samples']} samples</h1>
<p>A: {_esc(result['a'])} &nbsp; B: {_esc(result['b'])}</p>
<table><tr><th>image</th><th>sample</th><th>A</th><th>B</th></tr>{''.join(rows)}</table></body></html>"""
    with FileSystems.create(path) as f:
        f.write(page.encode("utf-8"))


def _usd(v) -> str:
    """A run's cost, or why there is none (a model without a price in --llm_prices or the
    built-in table: give the run its prices to compare dollars)."""
    return f"{v:,.4f}" if isinstance(v, (int, float)) else "not priced (no price for this model)"


def write_comparison(out: str, result: dict) -> dict:
    """`out`/comparison.json, README.md (tables and plots) and disagreements.html."""
    import os

    from apache_beam.io.filesystems import FileSystems

    from transforms.formats.files import write_json
    from transforms.report.card import Card, Plots, fmt_number, md_table, md_text, plain_text

    out = out.rstrip("/")
    if "://" not in out:
        os.makedirs(out, exist_ok=True)
    serial = dict(result)
    serial["disagreements"] = [{"key": d["key"], "a": d["a"].__dict__, "b": d["b"].__dict__} for d in result["disagreements"]]
    write_json(f"{out}/comparison.json", serial)
    thumbs = _thumbnails([result["a"], result["b"]], {d["key"] for d in result["disagreements"]})
    write_viewer(f"{out}/disagreements.html", result, thumbs)
    card, plots = Card(), Plots(out)
    ra, rb = result["runs"]["a"], result["runs"]["b"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    card.add("What this is",
             f"Two refine runs of the same input compared sample by sample: **A** `{md_text(result['a'])}` and "
             f"**B** `{md_text(result['b'])}`, {fmt_number(result['samples'])} samples. The disagreements are side by "
             "side in [disagreements.html](disagreements.html).", *[f"Warning: {md_text(w)}" for w in result["warnings"]])
    card.add("Agreement", md_table(["figure", "value"], [
        ["same outcome (and the same entity where both kept it)", pct(result["agreement"])],
        ["same outcome", pct(result["outcome_agreement"])],
        ["Cohen's kappa of the outcomes", "-" if result["kappa"] is None else f"{result['kappa']:.3f}"],
        [f"same entity, of the {fmt_number(result['label_agreement']['both_kept'])} both kept", pct(result["label_agreement"]["same_qid"])],
    ]))
    used = result["outcomes"]
    card.add("Outcomes, A (rows) against B (columns)",
             md_table(["A \\ B", *used], [[o, *[fmt_number(result["confusion"][o][p]) for p in used]] for o in used]))
    card.add("Agreement by retrieval score", md_table(["caption-title cosine", "samples", "agreement"], [
        [k, fmt_number(v["samples"]), pct(v["agreement"])] for k, v in result["by_score_bucket"].items()]))
    card.add("Agreement by A's grounding method", md_table(["method (or outcome)", "samples", "agreement"], [
        [k, fmt_number(v["samples"]), pct(v["agreement"])] for k, v in result["by_grounding_method"].items()]))
    card.add("The runs", md_table(["", "A", "B"], [
        ["model", md_text(ra["model"]), md_text(rb["model"])],
        ["backend", md_text(ra["backend"]), md_text(rb["backend"])],
        ["requests per sample", md_text(ra["rew_requests"]), md_text(rb["rew_requests"])],
        ["rejected", pct(ra["rejected_share"]), pct(rb["rejected_share"])],
        ["mean rationale (characters)", md_text(ra["mean_rationale_chars"]), md_text(rb["mean_rationale_chars"])],
        ["mean QA pairs", md_text(ra["mean_qa_pairs"]), md_text(rb["mean_qa_pairs"])],
        ["tokens in / out", f"{ra['tokens']['input']} / {ra['tokens']['output']}", f"{rb['tokens']['input']} / {rb['tokens']['output']}"],
        ["cost (USD)", _usd(ra["cost_usd"]), _usd(rb["cost_usd"])],
    ]))
    with plain_text():
        buckets = [k for k, v in result["by_score_bucket"].items() if v["samples"]]
        if buckets:
            plots.bars("agreement_by_score", buckets, [round(100 * (result["by_score_bucket"][k]["agreement"] or 0), 1) for k in buckets],
                       "Agreement of A and B by retrieval score", "Share of samples (%) on which the two runs agree, by "
                       "caption-title cosine.", xlabel="% agreement")
        cells = [(o, p, result["confusion"][o][p]) for o in used for p in used if result["confusion"][o][p] and o != p]
        if cells:
            plots.bars("disagreements", [f"A {o} / B {p}" for o, p, _ in cells], [n for *_, n in cells],
                       "Where A and B disagree", "Samples per pair of outcomes the runs disagree on.", horizontal=True)
    body = "\n\n".join(card.sections + [f"![{c}]({p})\n\n{c}" for p, c in plots.made])
    with FileSystems.create(f"{out}/README.md") as f:
        f.write(f"# REW runs compared\n\n{body}\n".encode())
    return {"comparison": f"{out}/comparison.json", "card": f"{out}/README.md", "viewer": f"{out}/disagreements.html"}
