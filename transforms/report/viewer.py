"""`viewer.html`: one self-contained static page per output directory (no server, no
network: thumbnails are inlined as data URIs, the script and styles are in the page).

It shows a sample of the records (thumbnail, entity title and QID, the original caption,
scores, the LLM's verdict, the candidate label it replaced, rationale and QA pairs) and a
sample of the rejects (reason, detail, the record as far as the reject file keeps it),
filterable by verdict, entity (title or QID, substring) and reject reason. The filters
live in the page's address (`viewer.html#verdict=corrected&entity=Q90`), so a filtered
view can be bookmarked or sent. Every text is inserted as text, never as HTML: captions
are untrusted web text.

The page holds thousands of rejects and stays responsive: a filter runs over the data
only, and only the first PAGE_SIZE matching cards are built and their images decoded;
"Show more" builds the next page (a card once built is kept for the next filter).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import defaultdict

from transforms.formats.text import strip_controls
from transforms.report.outputs import read_rejects, read_sample

log = logging.getLogger(__name__)

VIEWER_FILE = "viewer.html"
THUMB_SIDE = 160
# Larger images get no thumbnail (a 40-megapixel RGB image is 120 MB while it is decoded).
THUMB_MAX_PIXELS = 40_000_000
# Cards built per page of matches ("Show more" builds the next page).
PAGE_SIZE = 100
# Rejects a viewer holds by default (thumbnails the rejects kept, ~1.5-8 KB each).
MAX_REJECTS = 2000
RECORD_COLUMNS = ["key", "image", "url", "caption", "qid", "title", "score", "rank", "max_eval_similarity", "nearest_eval_id",
                  "verdict", "changed", "candidate_qid", "candidate_title", "llm_entity", "verify_reason", "grounding_method",
                  "rationale", "qa_json"]


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> str:
    """Image bytes -> a small JPEG data URI ('' when the bytes do not decode).

    The bytes are corpus bytes nothing has checked: they are decoded only by the guarded
    decoder (`transforms.io.images.decode_image`: accepted formats only, before any other
    Pillow plugin sees them, and at most THUMB_MAX_PIXELS pixels), a JPEG at a reduced
    scale. A refused or broken image shows as missing, it never breaks the page."""
    from transforms.io.images import ImageError, decode_image

    try:
        im = decode_image(data, max_pixels=THUMB_MAX_PIXELS, draft=(side, side)).image
    except ImageError:
        return ""
    try:
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=75)
    except (OSError, ValueError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _num(v, digits: int = 4):
    return round(float(v), digits) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _record(row: dict) -> dict:
    qa = []
    try:
        qa = [{"q": str(x.get("question", "")), "a": str(x.get("answer", ""))} for x in json.loads(row.get("qa_json") or "[]")]
    except (TypeError, ValueError, AttributeError):
        pass
    return {
        "kind": "kept",
        "key": row.get("key"),
        "img": thumbnail(row["image"]) if row.get("image") else "",
        "url": row.get("url"),
        "caption": row.get("caption"),
        "qid": row.get("qid"),
        "title": row.get("title"),
        "score": _num(row.get("score")),
        "rank": row.get("rank"),
        "eval_sim": _num(row.get("max_eval_similarity")),
        "verdict": row.get("verdict"),
        "changed": bool(row.get("changed")),
        "cand_qid": row.get("candidate_qid"),
        "cand_title": row.get("candidate_title"),
        "grounding": row.get("grounding_method"),
        "reason_llm": row.get("verify_reason"),
        "rationale": row.get("rationale"),
        "qa": qa,
    }


def _reject(r: dict) -> dict:
    try:
        rec = json.loads(r.get("record_json") or "{}")
    except ValueError:
        rec = {"record": r.get("record_json")}
    if not isinstance(rec, dict):
        rec = {"record": rec}
    thumb = r.get("thumbnail")
    return {
        "kind": "rejected",
        "key": r.get("key"),
        # A thumbnail the reject kept (a `data:image/jpeg` URL, nothing else is shown).
        "img": thumb if isinstance(thumb, str) and thumb.startswith("data:image/jpeg;base64,") else "",
        "eval_id": rec.get("eval_id"),
        "eval_img": "",
        "stage": r.get("stage"),
        "reason": r.get("reason"),
        "detail": r.get("detail"),
        "caption": rec.get("caption"),
        "qid": rec.get("qid"),
        "title": rec.get("title"),
        "url": rec.get("url"),
        "verdict": rec.get("verdict"),
        "record": json.dumps(rec, ensure_ascii=False, sort_keys=True)[:600],
    }


def sample_rejects(out: str, limit: int) -> list[dict]:
    """Up to `limit` rejects, shared between stages and, within a stage, between reasons
    (the commonest reason does not crowd out the rare ones)."""
    by_reason = defaultdict(list)
    for r in read_rejects(out, limit=20 * limit):
        by_reason[(r.get("stage"), r.get("reason"))].append(r)
    chosen, i = [], 0
    groups = [by_reason[k] for k in sorted(by_reason, key=str)]
    while len(chosen) < limit and any(i < len(g) for g in groups):
        chosen += [g[i] for g in groups if i < len(g)]
        i += 1
    return chosen[:limit]


# In a <script> element the HTML parser looks for "</script", "<!--" and "<script" before
# any JSON is parsed: none of them may appear, so no "<" at all. ">" and "&" go too (for
# parsers and tools that look for "-->" or entities), and U+2028 / U+2029, which end a
# line in older JavaScript. Each is a JSON string escape, so the parsed data is the same.
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(value) -> str:
    """`value` as JSON that is safe as the text of a `<script type="application/json">`
    element, whatever its strings hold."""
    text = json.dumps(value, ensure_ascii=False)
    for ch, escaped in _SCRIPT_ESCAPES.items():
        text = text.replace(ch, escaped)
    return text


def _clean(value):
    """Strings of a record without control and bidirectional-override characters (a caption
    with U+202E would show other text than it holds)."""
    if isinstance(value, str):
        return strip_controls(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_viewer(out: str, manifest: dict, files: list[tuple[str, int]], max_records: int = 300,
                 max_rejects: int = MAX_REJECTS) -> str:
    from apache_beam.io.filesystems import FileSystems

    records = []
    if files:
        table, n, total = read_sample(files, RECORD_COLUMNS, max_rows=max_records * 4)
        if table is not None and table.num_rows:
            step = max(1, table.num_rows // max_records)
            rows = table.slice(0).to_pylist()[::step][:max_records]
            records = [_record(r) for r in rows]
    rejects = [_reject(r) for r in sample_rejects(out, max_rejects)]
    # A reject's image is not in the output; where it came from a Parquet input the run lists,
    # the sampled rejects' images are read back from there (those rows only).
    from transforms.report.outputs import image_sources, thumbnails

    wanted = {r["key"] for r in rejects if r.get("key") and not r["img"]}
    if wanted:
        found = thumbnails(image_sources([out], own=False), wanted, THUMB_SIDE)
        for r in rejects:
            r["img"] = r["img"] or found.get(r.get("key"), "")
    # A near-duplicate beside the evaluation image it matched (eval_set/thumbnails-*.parquet).
    eval_ids = {str(r["eval_id"]) for r in rejects if r.get("eval_id")}
    if eval_ids and manifest.get("eval_set"):
        try:
            paths = sorted(m.path for m in FileSystems.match([f"{manifest['eval_set'].rstrip('/')}/thumbnails-*.parquet"])[0].metadata_list)
        except Exception:  # noqa: BLE001 - an eval set from before thumbnails were kept
            paths = []
        found = thumbnails(paths, eval_ids, THUMB_SIDE)
        for r in rejects:
            r["eval_img"] = found.get(str(r.get("eval_id") or ""), "")
    records += rejects
    kind = manifest.get("kind", "?")
    counters = manifest.get("counters") or {}
    meta = {
        "kind": kind,
        "folder": out.rstrip("/").rsplit("/", 1)[-1],
        "created": manifest.get("created"),
        "kept_total": sum(r for _, r in files),
        "rejected_total": sum(v for k, v in counters.items() if k.startswith("rejected_") and not k.endswith("_files")),
        "page_size": PAGE_SIZE,
    }
    payload = script_json(_clean({"meta": meta, "records": records}))
    title = html.escape(strip_controls(f"entityforge viewer: {meta['folder']} ({kind})"), quote=True)
    # The page is cut at its one data slot, the title goes into the part before it and the
    # data in between: no substitution ever runs over data (a caption may say __TITLE__).
    head, tail = PAGE.split("__DATA__")
    page = head.replace("__TITLE__", title) + payload + tail
    path = f"{out.rstrip('/')}/{VIEWER_FILE}"
    with FileSystems.create(path) as f:
        f.write(page.encode("utf-8"))
    return path


PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f6f4; color: #222; }
  header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 10px 16px; z-index: 1; }
  header h1 { font-size: 17px; margin: 0 0 6px 0; }
  header .meta { font-size: 12px; color: #666; margin-bottom: 8px; }
  .filters { display: flex; gap: 12px; flex-wrap: wrap; align-items: center; font-size: 13px; }
  .filters select, .filters input { font-size: 13px; padding: 3px 6px; }
  #count { font-size: 13px; color: #444; margin-left: auto; }
  main { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; padding: 14px 16px; }
  .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; font-size: 13px; display: flex; flex-direction: column; gap: 5px; }
  .card.rejected { border-color: #e0a0a0; background: #fffafa; }
  .top { display: flex; gap: 10px; flex-wrap: wrap; }
  .top > div:last-child { flex: 1 1 140px; min-width: 0; overflow-wrap: anywhere; }
  .card { min-width: 0; overflow-wrap: anywhere; }
  .evalfig { margin: 0; width: 120px; flex: none; }
  .evalfig figcaption { font-size: 11px; color: #666; }
  .thumb { width: 120px; height: 120px; object-fit: cover; border-radius: 4px; background: #eee; flex: none; }
  .noimg { width: 120px; height: 120px; border-radius: 4px; background: repeating-linear-gradient(45deg, #eee, #eee 6px, #f6f6f6 6px, #f6f6f6 12px);
           display: flex; align-items: center; justify-content: center; color: #999; font-size: 11px; text-align: center; flex: none; }
  .entity { font-weight: 600; font-size: 14px; }
  .qid { color: #666; font-weight: normal; }
  .caption { color: #333; font-style: italic; }
  .badge { display: inline-block; padding: 1px 6px; border-radius: 8px; font-size: 11px; color: #fff; background: #777; margin-right: 4px; }
  .badge.correct { background: #3a8f4f; } .badge.corrected { background: #d07a2b; } .badge.not_an_entity, .badge.rejected { background: #b94a48; }
  .scores { color: #555; font-size: 12px; }
  .was { color: #a05a00; font-size: 12px; }
  .rationale { color: #333; }
  .qa { margin: 0; padding-left: 16px; color: #333; }
  .detail, .record { color: #555; font-size: 12px; word-break: break-word; }
  .record { font-family: ui-monospace, monospace; font-size: 11px; }
  .empty { padding: 40px; color: #777; }
  #after { padding: 0 16px 24px 16px; }
  .more { font-size: 14px; padding: 8px 16px; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div class="meta" id="meta"></div>
  <div class="filters">
    <label>show <select id="f-show"><option value="all">kept and rejected</option><option value="kept">kept</option><option value="rejected">rejected</option></select></label>
    <label>verdict <select id="f-verdict"><option value="">any</option></select></label>
    <label>reject reason <select id="f-reason"><option value="">any</option></select></label>
    <label>entity <input id="f-entity" type="search" placeholder="title or QID"></label>
    <span id="count"></span>
  </div>
</header>
<main id="grid"></main>
<div id="after"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const grid = document.getElementById("grid");
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined && text !== null) e.textContent = String(text); return e; };
const fmt = (v) => (v === null || v === undefined) ? "" : (typeof v === "number" ? v.toFixed(3) : String(v));

document.getElementById("title").textContent = "entityforge: " + DATA.meta.folder + " (" + DATA.meta.kind + ")";
document.getElementById("meta").textContent = "written " + (DATA.meta.created || "?") + " \u00b7 " + DATA.meta.kept_total.toLocaleString() +
  " records, " + DATA.meta.rejected_total.toLocaleString() + " rejected \u00b7 this page: a sample of " +
  DATA.records.filter(r => r.kind === "kept").length + " records and " + DATA.records.filter(r => r.kind === "rejected").length + " rejects";

function options(id, values) {
  const sel = document.getElementById(id);
  for (const v of [...new Set(values.filter(Boolean))].sort()) { const o = el("option", null, v); o.value = v; sel.appendChild(o); }
}
options("f-verdict", DATA.records.map(r => r.verdict));
options("f-reason", DATA.records.map(r => r.reason ? r.stage + " / " + r.reason : null));

function render(r) {
  const c = el("div", "card " + r.kind);
  c.dataset.kind = r.kind;
  const top = el("div", "top");
  if (r.img) { const im = el("img", "thumb"); im.src = r.img; im.alt = r.title || r.key || ""; im.loading = "eager"; top.appendChild(im); }
  else top.appendChild(el("div", "noimg", r.kind === "rejected" ? "image not kept with this reject" : "no image"));
  if (r.eval_img) {
    const ev = el("figure", "evalfig");
    const im = el("img", "thumb eval"); im.src = r.eval_img; im.alt = "evaluation image " + (r.eval_id || ""); im.loading = "eager";
    ev.appendChild(im); ev.appendChild(el("figcaption", "qid", "matched evaluation image " + (r.eval_id || "")));
    top.appendChild(ev);
  }
  const side = el("div");
  const ent = el("div", "entity", r.title || "(no entity)");
  if (r.qid) ent.appendChild(el("span", "qid", " " + r.qid));
  side.appendChild(ent);
  const badges = el("div");
  if (r.kind === "rejected") badges.appendChild(el("span", "badge rejected", r.stage + " / " + r.reason));
  if (r.verdict) badges.appendChild(el("span", "badge " + r.verdict, r.verdict));
  if (r.grounding) badges.appendChild(el("span", "badge", "grounded: " + r.grounding));
  side.appendChild(badges);
  const s = [];
  if (r.score !== null && r.score !== undefined) s.push("score " + fmt(r.score) + (r.rank ? " (#" + r.rank + ")" : ""));
  if (r.eval_sim !== null && r.eval_sim !== undefined) s.push("eval cosine " + fmt(r.eval_sim));
  if (s.length) side.appendChild(el("div", "scores", s.join(" \u00b7 ")));
  if (r.changed && r.cand_title) side.appendChild(el("div", "was", "was: " + r.cand_title + " (" + r.cand_qid + ")"));
  top.appendChild(side);
  c.appendChild(top);
  if (r.caption) c.appendChild(el("div", "caption", "\u201c" + r.caption + "\u201d"));
  if (r.reason_llm) c.appendChild(el("div", "detail", "LLM: " + r.reason_llm));
  if (r.rationale) c.appendChild(el("div", "rationale", r.rationale));
  if (r.qa && r.qa.length) { const ul = el("ul", "qa"); for (const qa of r.qa) ul.appendChild(el("li", null, qa.q + " \u2192 " + qa.a)); c.appendChild(ul); }
  if (r.detail) c.appendChild(el("div", "detail", r.detail));
  if (r.kind === "rejected" && r.record) c.appendChild(el("div", "record", r.record));
  if (r.key) c.appendChild(el("div", "detail", r.key));
  return c;
}

// Only what is shown is built: a filter runs over DATA, then the first `limit` matches
// get a card (built once, kept for later filters) and their images are decoded.
const PAGE = DATA.meta.page_size || 100;
const built = new Map();
let matching = [], limit = PAGE;
const empty = el("div", "empty", "Nothing matches these filters.");
const more = el("button", "more");
more.id = "more";
more.addEventListener("click", () => { limit += PAGE; draw(); });
document.getElementById("after").appendChild(more);

function card(i) {
  let node = built.get(i);
  if (!node) {
    node = render(DATA.records[i]);
    for (const im of node.querySelectorAll("img")) im.addEventListener("load", stats);
    built.set(i, node);
  }
  return node;
}
function stats() {
  // Counted over the built page only (at most a few hundred cards), on each image load.
  let images = 0, evals = 0;
  for (const node of grid.querySelectorAll(".card")) {
    const im = node.querySelector("img.thumb"); if (im && im.complete && im.naturalWidth > 0) images++;
    const ev = node.querySelector("img.eval"); if (ev && ev.complete && ev.naturalWidth > 0) evals++;
  }
  document.body.dataset.imagesLoaded = String(images);
  document.body.dataset.evalImagesLoaded = String(evals);
}
function draw() {
  const frag = document.createDocumentFragment();
  const shown = Math.min(limit, matching.length);
  for (let j = 0; j < shown; j++) frag.appendChild(card(matching[j]));
  if (!shown) frag.appendChild(empty);
  grid.replaceChildren(frag);
  const left = matching.length - shown;
  more.style.display = left > 0 ? "" : "none";
  more.textContent = "Show " + Math.min(PAGE, left) + " more (" + left.toLocaleString() + " not shown)";
  document.getElementById("count").textContent = (shown < matching.length ? shown + " shown of " : "") + matching.length +
    " matching (" + DATA.records.length + " in this page)";
  document.body.dataset.shown = String(shown);
  document.body.dataset.matching = String(matching.length);
  document.body.dataset.built = String(built.size);
  stats();
}

function state() {
  return { show: document.getElementById("f-show").value, verdict: document.getElementById("f-verdict").value,
           reason: document.getElementById("f-reason").value, entity: document.getElementById("f-entity").value.trim().toLowerCase() };
}
function apply() {
  const f = state();
  matching = [];
  DATA.records.forEach((r, i) => {
    const ok = (f.show === "all" || r.kind === f.show) && (!f.verdict || r.verdict === f.verdict) &&
      (!f.reason || (r.reason && r.stage + " / " + r.reason === f.reason)) &&
      (!f.entity || (r.title || "").toLowerCase().includes(f.entity) || (r.qid || "").toLowerCase() === f.entity ||
       (r.cand_title || "").toLowerCase().includes(f.entity) || (r.cand_qid || "").toLowerCase() === f.entity);
    if (ok) matching.push(i);
  });
  limit = PAGE;
  draw();
  const h = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v && !(k === "show" && v === "all")) h.set(k, v);
  const hash = h.toString();
  try { if (hash !== location.hash.slice(1)) history.replaceState(null, "", hash ? "#" + hash : location.pathname); } catch (e) { /* a browser that refuses it keeps the old address */ }
}
function fromHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  for (const k of ["show", "verdict", "reason", "entity"]) { const v = h.get(k); if (v !== null) document.getElementById("f-" + k).value = v; }
}
for (const id of ["f-show", "f-verdict", "f-reason"]) document.getElementById(id).addEventListener("change", apply);
let typing = null;
document.getElementById("f-entity").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(apply, 120); });
window.addEventListener("hashchange", () => { fromHash(); apply(); });
fromHash();
apply();
window.addEventListener("load", stats);
</script>
</body>
</html>
"""
