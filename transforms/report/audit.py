"""A person's audit of an output's labels (`pipelines.audit`): a stratified, seeded sample
shown one record at a time in a self-contained page, the judgments exported as JSON lines,
and read back into precisions with Wilson intervals, re-weighted to the whole output.

Strata: a kept record by (verdict, grounding method, retrieval-score bucket); a rejected one
by (stage, reason). The sample gives every stratum at least one record when the sample is
large enough, the rest in proportion to the strata's sizes (seeded), and records each
stratum's size N_h and sample size n_h: a judged record stands for N_h / n_h records.

Judgments: `right` / `wrong` / `unsure` for a kept record, `rightly_dropped` /
`wrongly_dropped` / `unsure` for a reject. A precision is the weighted share of `right`
(or `rightly_dropped`) among the judged records of a group that are not `unsure`; its 95 %
interval is Wilson's, at the Kish effective sample size of the weights. Several reviewers'
files combine: a record's judgment is the reviewers' majority (a tie is `unsure`), and
their agreement (share of records two reviewers judged the same, Cohen's kappa) is shown.
"""

from __future__ import annotations

import html
import json
import math
import random
from collections import Counter, defaultdict
from typing import Optional

from transforms.errors import UsageError
from transforms.formats import safe_json
from transforms.formats.files import open_read, read_json
from transforms.formats.text import strip_controls
from transforms.report.compare import kappa, score_bucket

KEPT_JUDGMENTS = ("right", "wrong", "unsure")
REJECT_JUDGMENTS = ("rightly_dropped", "wrongly_dropped", "unsure")
GOOD = {"right", "rightly_dropped"}
BAD = {"wrong", "wrongly_dropped"}
AUDIT_DIR = "audit"
IMAGE_SIDE = 512
Z95 = 1.959964


def population(out: str) -> list[dict]:
    """Every record of an output: its kept rows (no image bytes) and its rejects, each with
    its stratum."""
    import pyarrow.parquet as pq

    from transforms.report.outputs import parquet_files, read_rejects

    out = out.rstrip("/")
    try:
        manifest = read_json(f"{out}/manifest.json")
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{out}: no readable manifest.json ({type(e).__name__}: {e}); give an output folder") from e
    records = []
    cols = ["key", "qid", "title", "verdict", "grounding_method", "score", "caption", "verify_reason", "candidate_qid",
            "candidate_title", "llm_model", "max_eval_similarity"]
    for path, _ in parquet_files(out, manifest):
        with open_read(path) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(columns=[c for c in cols if c in pf.schema_arrow.names], batch_size=65_536):
                for row in batch.to_pylist():
                    verdict = row.get("verdict") or "kept"
                    method = row.get("grounding_method") or "-"
                    records.append({"key": row["key"], "kind": "kept", "verdict": verdict, "method": method,
                                    "bucket": score_bucket(row.get("score")), "score": row.get("score"),
                                    "qid": row.get("qid"), "title": row.get("title"), "caption": row.get("caption") or "",
                                    "reason": row.get("verify_reason") or "", "model": row.get("llm_model"),
                                    "candidate": row.get("candidate_title"),
                                    "stratum": f"kept | {verdict} | {method} | score {score_bucket(row.get('score'))}"})
    for r in read_rejects(out, limit=10**9):
        try:
            rec = json.loads(r.get("record_json") or "{}")
        except ValueError:
            rec = {}
        rec = rec if isinstance(rec, dict) else {}
        records.append({"key": r.get("key") or r.get("source") or "?", "kind": "rejected", "verdict": "rejected",
                        "method": f"{r.get('stage')}/{r.get('reason')}", "bucket": "unknown", "score": None,
                        "qid": rec.get("qid"), "title": rec.get("title"), "caption": str(rec.get("caption") or ""),
                        "reason": f"{r.get('stage')}/{r.get('reason')}: {r.get('detail') or ''}", "model": None,
                        "candidate": None, "stratum": f"rejected | {r.get('stage')} | {r.get('reason')}",
                        "thumbnail": r.get("thumbnail") if str(r.get("thumbnail") or "").startswith("data:image/jpeg;base64,") else None})
    return records


def stratified_sample(records: list[dict], n: int, seed: int) -> tuple[list[dict], dict[str, dict]]:
    """(sampled records, stratum -> {"N", "n", "weight"}): at least one per stratum when n
    allows, the rest in proportion to the strata's sizes (largest remainders), seeded."""
    rng = random.Random(seed)
    strata: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        strata[r["stratum"]].append(r)
    names = sorted(strata)
    total = len(records)
    n = min(n, total)
    alloc = {s: 0 for s in names}
    if n >= len(names):
        for s in names:
            alloc[s] = 1
    rest = n - sum(alloc.values())
    if rest > 0:
        room = {s: len(strata[s]) - alloc[s] for s in names}
        base = sum(room.values())
        shares = {s: rest * room[s] / base for s in names} if base else {}
        for s in names:
            alloc[s] += min(room[s], int(shares.get(s, 0)))
        left = n - sum(alloc.values())
        for s in sorted(names, key=lambda s: (-(shares.get(s, 0) - int(shares.get(s, 0))), s)):
            if left <= 0:
                break
            if alloc[s] < len(strata[s]):
                alloc[s] += 1
                left -= 1
    sample, info = [], {}
    for s in names:
        members = sorted(strata[s], key=lambda r: r["key"])
        chosen = rng.sample(members, alloc[s]) if alloc[s] else []
        sample += chosen
        info[s] = {"N": len(members), "n": len(chosen), "weight": len(members) / len(chosen) if chosen else None}
    rng.shuffle(sample)
    return sample, info


def _esc(v) -> str:
    return html.escape(strip_controls(str(v if v is not None else "")))


def write_page(path: str, out: str, sample: list[dict], strata: dict, seed: int, images: dict[str, str]) -> None:
    """The audit page: one record at a time; keys judge it, judgments stay in the page's
    local storage, Export downloads them as JSON lines. The records travel as JSON in a
    script element whose text is never parsed as HTML (`<` escaped)."""
    from apache_beam.io.filesystems import FileSystems

    items = [{k: r.get(k) for k in ("key", "kind", "verdict", "method", "bucket", "qid", "title", "caption", "reason", "model",
                                     "candidate", "stratum")} | {"image": images.get(r["key"])} for r in sample]
    data = json.dumps({"output": out, "seed": seed, "records": items}, ensure_ascii=True).replace("<", "\\u003c")
    storage = f"entityforge-audit:{out}:{seed}"
    page = f"""<!doctype html><html><head><meta charset=utf-8><title>Audit of {_esc(out)}</title>
<style>body{{font:15px sans-serif;margin:16px;max-width:1100px}}#img{{width:512px;max-width:100%;height:auto;max-height:512px;object-fit:contain;display:block;margin:8px 0;background:#eee}}
.k{{color:#777;font-size:12px}}.lab{{font-size:20px;font-weight:bold}}.why{{font-style:italic}}.keys b{{border:1px solid #999;
padding:0 4px;border-radius:3px}}#state{{font-weight:bold}}.right,.rightly_dropped{{color:#2a7}}.wrong,.wrongly_dropped{{color:#b33}}</style>
</head><body><h1>Audit: {len(items)} records of {_esc(out)}</h1>
<p>Reviewer: <input id=reviewer placeholder="your name"> &nbsp; <span id=progress></span> &nbsp;
<button id=export>Export judgments (JSON lines)</button></p>
<p class=keys>Kept record: <b>r</b> right, <b>w</b> wrong, <b>u</b> unsure. Rejected record: <b>d</b> rightly dropped,
<b>k</b> wrongly dropped (should have been kept), <b>u</b> unsure. <b>&larr;</b> / <b>&rarr;</b> move.</p>
<div id=card><div class=k id=stratum></div><img id=img alt=""><div id=noimg></div><div class=lab id=label></div>
<div id=caption></div><div class=why id=reason></div><div class=k id=meta></div><p>Judgment: <span id=state></span></p></div>
<script type="application/json" id=data>{data}</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const KEY = {json.dumps(storage)};
let judged = JSON.parse(localStorage.getItem(KEY) || '{{}}');
let i = 0;
const $ = id => document.getElementById(id);
$('reviewer').value = localStorage.getItem(KEY + ':reviewer') || '';
$('reviewer').addEventListener('input', () => localStorage.setItem(KEY + ':reviewer', $('reviewer').value));
function show() {{
  const r = D.records[i];
  $('stratum').textContent = `${{i + 1}} / ${{D.records.length}}  ·  ${{r.stratum}}  ·  ${{r.key}}`;
  if (r.image) {{ $('img').src = r.image; $('img').style.display = 'block'; $('noimg').textContent = ''; }}
  else {{ $('img').removeAttribute('src'); $('img').style.display = 'none'; $('noimg').textContent = '(image not found in the output or its inputs)'; }}
  $('label').textContent = (r.kind === 'kept' ? 'label: ' : 'dropped: ') + (r.title || '(no title)') + (r.qid ? ' (' + r.qid + ')' : '');
  $('caption').textContent = 'caption: ' + r.caption;
  $('reason').textContent = r.reason;
  $('meta').textContent = [r.verdict, r.method, r.model, r.candidate ? 'candidate: ' + r.candidate : ''].filter(Boolean).join(' · ');
  const j = judged[r.key];
  $('state').textContent = j ? j.judgment : '(none)';
  $('state').className = j ? j.judgment : '';
  $('progress').textContent = Object.keys(judged).length + ' judged';
}}
function judge(value) {{
  const r = D.records[i];
  judged[r.key] = {{key: r.key, judgment: value, stratum: r.stratum, kind: r.kind, reviewer: $('reviewer').value || 'anonymous',
                   output: D.output, seed: D.seed, time: new Date().toISOString()}};
  localStorage.setItem(KEY, JSON.stringify(judged));
  if (i < D.records.length - 1) i++;
  show();
}}
document.addEventListener('keydown', e => {{
  if (e.target.tagName === 'INPUT') return;
  const kept = D.records[i].kind === 'kept';
  const map = kept ? {{r: 'right', w: 'wrong', u: 'unsure'}} : {{d: 'rightly_dropped', k: 'wrongly_dropped', u: 'unsure'}};
  if (map[e.key]) {{ judge(map[e.key]); e.preventDefault(); }}
  else if (e.key === 'ArrowRight' && i < D.records.length - 1) {{ i++; show(); }}
  else if (e.key === 'ArrowLeft' && i > 0) {{ i--; show(); }}
}});
$('export').addEventListener('click', () => {{
  const lines = Object.values(judged).map(j => JSON.stringify(j)).join('\\n') + '\\n';
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([lines], {{type: 'application/x-ndjson'}}));
  a.download = 'judgments-' + ($('reviewer').value || 'anonymous') + '.jsonl';
  document.body.appendChild(a); a.click(); a.remove();
}});
show();
</script></body></html>"""
    with FileSystems.create(path) as f:
        f.write(page.encode("utf-8"))


def make_audit(out: str, n: int, seed: int) -> dict:
    """Sample the output, write `<out>/audit/audit.html` and `audit_sample.json` (the sample's
    keys and strata weights, what the judgments are read against)."""
    import os

    from transforms.formats.files import write_json
    from transforms.report.outputs import image_sources, thumbnails

    out = out.rstrip("/")
    records = population(out)
    if not records:
        raise UsageError(f"{out} holds no records to audit (no Parquet shards, no rejects)")
    sample, strata = stratified_sample(records, n, seed)
    folder = f"{out}/{AUDIT_DIR}"
    if "://" not in folder:
        os.makedirs(folder, exist_ok=True)
    # A reject's own thumbnail (decontaminate keeps one), else the image read back from the
    # output's shards or the Parquet input it came from.
    images = {r["key"]: r["thumbnail"] for r in sample if r.get("thumbnail")}
    images.update(thumbnails(image_sources([out]), {r["key"] for r in sample} - set(images), IMAGE_SIDE))
    write_page(f"{folder}/audit.html", out, sample, strata, seed, images)
    meta = {"output": out, "seed": seed, "population": len(records), "sample": len(sample), "strata": strata,
            "records": {r["key"]: {k: r[k] for k in ("kind", "verdict", "method", "bucket", "stratum")} for r in sample}}
    write_json(f"{folder}/audit_sample.json", meta)
    return {"page": f"{folder}/audit.html", "sample": f"{folder}/audit_sample.json", "records": len(sample),
            "strata": len(strata), "with_image": sum(1 for r in sample if r["key"] in images)}


# --------------------------------------------------------------------------------------
# Reading judgments back
# --------------------------------------------------------------------------------------


def read_judgments(paths: list[str]) -> list[dict]:
    """Judgment lines of every file (hostile input: parsed by the guarded decoder, checked)."""
    found = []
    for path in paths:
        with open_read(path) as f:
            for n, line in enumerate(f.read().decode("utf-8", "replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    j = safe_json.loads(line)
                except ValueError as e:
                    raise UsageError(f"--judgments {path}: line {n} is not JSON ({e})") from e
                if not isinstance(j, dict) or not isinstance(j.get("key"), str) or \
                        j.get("judgment") not in KEPT_JUDGMENTS + REJECT_JUDGMENTS:
                    raise UsageError(f"--judgments {path}: line {n} is not a judgment (key, judgment in "
                                     f"{', '.join(sorted(set(KEPT_JUDGMENTS + REJECT_JUDGMENTS)))})")
                found.append({"key": j["key"], "judgment": j["judgment"], "reviewer": str(j.get("reviewer") or path)})
    return found


def wilson(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion `p` observed on `n` (effective) trials."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def weighted_precision(items: list[tuple[bool, float]]) -> Optional[dict]:
    """(good?, weight) of the judged records of a group -> the weighted share good, its
    Wilson 95 % interval at the Kish effective size, and the counts."""
    if not items:
        return None
    total = sum(w for _, w in items)
    p = sum(w for good, w in items if good) / total
    n_eff = total * total / sum(w * w for _, w in items)
    lo, hi = wilson(p, n_eff)
    return {"precision": round(p, 6), "low": round(lo, 6), "high": round(hi, 6), "judged": len(items),
            "good": sum(1 for good, _ in items if good), "effective_n": round(n_eff, 2)}


def evaluate(out: str, paths: list[str]) -> dict:
    """Precision per verdict, rejection reason, grounding method and score bucket, and overall,
    re-weighted by the strata weights of the sample the judgments were made on."""
    out = out.rstrip("/")
    try:
        meta = read_json(f"{out}/{AUDIT_DIR}/audit_sample.json")
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{out}/{AUDIT_DIR}/audit_sample.json not readable ({e}): run pipelines.audit {out} first") from e
    judgments = read_judgments(paths)
    by_key: dict[str, dict[str, str]] = defaultdict(dict)
    unknown = 0
    for j in judgments:
        if j["key"] not in meta["records"]:
            unknown += 1
            continue
        by_key[j["key"]][j["reviewer"]] = j["judgment"]
    reviewers = sorted({r for v in by_key.values() for r in v})
    final = {}
    for key, votes in by_key.items():
        counts = Counter(votes.values()).most_common()
        final[key] = "unsure" if len(counts) > 1 and counts[0][1] == counts[1][1] else counts[0][0]
    groups: dict[str, dict[str, list]] = {"overall": defaultdict(list), "verdict": defaultdict(list),
                                          "rejection_reason": defaultdict(list), "grounding_method": defaultdict(list),
                                          "score_bucket": defaultdict(list)}
    for key, judgment in final.items():
        if judgment == "unsure":
            continue
        rec = meta["records"][key]
        weight = meta["strata"][rec["stratum"]]["weight"]
        item = (judgment in GOOD, weight)
        if rec["kind"] == "kept":
            groups["overall"]["kept (label right)"].append(item)
            groups["verdict"][rec["verdict"]].append(item)
            groups["grounding_method"][rec["method"]].append(item)
            groups["score_bucket"][rec["bucket"]].append(item)
        else:
            groups["overall"]["rejected (rightly dropped)"].append(item)
            groups["rejection_reason"][rec["method"]].append(item)
    result = {g: {k: weighted_precision(v) for k, v in sorted(items.items())} for g, items in groups.items()}
    agreement = []
    for i, a in enumerate(reviewers):
        for b in reviewers[i + 1:]:
            pairs = [(v[a], v[b]) for v in by_key.values() if a in v and b in v]
            if pairs:
                agreement.append({"reviewers": [a, b], "records": len(pairs),
                                  "agreement": round(sum(x == y for x, y in pairs) / len(pairs), 6),
                                  "kappa": None if kappa(pairs) is None else round(kappa(pairs), 6)})
    return {"output": out, "files": paths, "reviewers": reviewers, "judged": len(final),
            "unsure": sum(1 for v in final.values() if v == "unsure"), "ignored_unknown_keys": unknown,
            "sample": meta["sample"], "population": meta["population"], "precision": result, "agreement": agreement}
