"""Dataset cards: `README.md` (Hugging Face dataset-card style, YAML front matter) with
tables and matplotlib plots in `plots/`, and `viewer.html`, written into every output
directory when its run finishes (and again on demand: `python -m pipelines.card DIR`).

What a card reads, at any scale:
* counts (the tables) come from the run's `manifest.json` counters: exact, and checked by
  the run's count identities before the card is written;
* distributions (the plots) come from the output's Parquet shards, reading only the
  columns a plot needs from at most `max_rows` rows (200,000 by default) taken from files
  spread over the whole output, so a 2B-row output costs the same as a 200k-row one; a
  plot drawn from a sample says so in its title;
* the viewer holds `viewer_records` records (thumbnails re-encoded to ~10 KB each) and
  up to `viewer_rejects` rejects (the thumbnails they kept, or read back from the inputs);
  the page builds only the cards a filter shows, a page at a time.
Everything is drawn on the machine that launched the run (the Dataflow launcher), after
the pipeline: nothing here runs on workers.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import re
from collections import Counter
from typing import Optional

from transforms.formats.files import open_read
from transforms.formats.text import strip_controls
from transforms.report.outputs import MAX_ROWS, parquet_files, read_rejects, read_sample, reject_counts
from transforms.report.viewer import MAX_REJECTS, write_viewer

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
PLOTS_DIR = "plots"
TOP_ENTITIES = 15

# What each kind of output is, for the card's title and front matter.
KINDS = {
    "entity_index": ("Entity index", "the catalog's entity titles embedded for nearest-neighbour search"),
    "candidates": ("Entity-LAION candidates", "captioned web images selected for catalog entities by caption-to-title kNN (GER's Entity-LAION rule)"),
    "decontaminated_shards": ("Training shards", "candidate images with near-duplicates of the evaluation images removed (CLIP cosine), in training-shard formats"),
    "rew_shards": ("REW training shards", "training samples whose labels a multimodal LLM verified or corrected, with visual rationales and QA pairs (REW)"),
    "oven_shards": ("OVEN shards", "an OVEN-format annotation file and its images as training shards"),
    "entity_codes": ("Entity codes", "token-id codes for every catalog entity, decoded by the generative recognition model"),
    "eval_embeddings": ("Evaluation-set embeddings", "CLIP embeddings of the evaluation images that training data is decontaminated against"),
    "model": ("Model", "a model trained on entityforge shards for visual entity recognition"),
}


def size_category(n: int) -> str:
    """Hugging Face's size_categories bucket for n rows."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    for bound, name in bounds:
        if n < bound:
            return name
    return "1B<n<10B" if n < 10_000_000_000 else "n>10B"


def fmt_number(v) -> str:
    """Counts with thousands separators, shares and scores at 4 significant digits."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


class Md(str):
    """Markdown this module wrote itself (a code span, a formatted figure): a table cell
    that md_table keeps as it is. Every other cell is escaped as text."""


# Characters that start Markdown or GFM syntax inline: emphasis, code, links and images,
# table cells, strikethrough, math ($, on GitHub), autolinks (":" of "http://"). "<", ">"
# and "&" are HTML-escaped instead; "_" is escaped only where it could start or end
# emphasis (inside a word, as in `assigned_to_other_entity`, it cannot).
_MD_SPECIAL = re.compile(r"([\\`*\[\]()!|#~$:{}])")
_MD_UNDERSCORES = re.compile(r"_+")
_MD_WWW = re.compile(r"(?i)\b(www)\.")


def _md_underscores(m: re.Match) -> str:
    text, a, b = m.string, m.start(), m.end()
    if a > 0 and b < len(text) and text[a - 1].isalnum() and text[b].isalnum():
        return m.group(0)
    return m.group(0).replace("_", "\\_")


def md_text(v) -> str:
    """A value as Markdown that renders as its literal text on GitHub and Hugging Face, in
    a table cell: no HTML, link, image, emphasis or math from data, one line."""
    text = " ".join(strip_controls(str(v)).split())
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = _MD_UNDERSCORES.sub(_md_underscores, text)
    text = _MD_WWW.sub(r"\1\\.", text)
    return html.escape(text, quote=False)


def md_code(v) -> Md:
    """A value as an inline code span (shown verbatim: no HTML or Markdown inside), one
    line, its "|" escaped for the table and its fence longer than any backtick run in it.
    A value with "<", ">" or "&" is escaped text instead (md_text): the card's Markdown
    then holds no raw HTML from data at all, for any renderer or sanitiser."""
    text = " ".join(strip_controls(str(v)).split())
    if re.search(r"[<>&]", text):
        return Md(md_text(text))
    text = text.replace("|", "\\|")
    fence = "`" * (1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return Md(f"{fence}{pad}{text}{pad}{fence}")


def _md_cell(v) -> str:
    return v if isinstance(v, Md) else md_text(v)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- data access


# ---------------------------------------------------------------------------- plots


def bin_edges(values: list[float], bins: int = 40, threshold: Optional[float] = None) -> list[float]:
    """Histogram bin edges over `values` with `threshold` (when inside their range, or at its
    edge) one of the edges: nothing on one side of a threshold line is drawn in a bin that
    reaches over to the other side."""
    lo, hi = min(values), max(values)
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        return [lo - 0.5, hi + 0.5] if threshold is None else [threshold - 0.5, threshold, threshold + 0.5]
    width = (hi - lo) / bins
    if threshold is None:
        return [lo + width * i for i in range(bins + 1)]
    # Whole bins of the same width counted from the threshold both ways, so the threshold
    # is an edge and the bins stay equal.
    below = max(0, math.ceil((threshold - lo) / width - 1e-9))
    above = max(0, math.ceil((hi - threshold) / width - 1e-9))
    edges = [threshold - width * i for i in range(below, 0, -1)] + [threshold] + [threshold + width * i for i in range(1, above + 1)]
    if len(edges) < 2:
        edges.append(threshold + width)
    # A value exactly at the top edge counts in the last bin (numpy's closed last bin).
    return edges


class Plots:
    """Draws figures into `<out>/plots/NAME.png` and remembers them for the card, and the bin
    edges of every histogram (`edges[name]`)."""

    def __init__(self, out: str):
        self.out = out
        self.made: list[tuple[str, str]] = []  # (relative path, caption)
        self.edges: dict[str, list[float]] = {}

    def save(self, fig, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt
        from apache_beam.io.filesystems import FileSystems
        from matplotlib.text import Text

        buf = io.BytesIO()
        try:
            with plain_text():
                # Labels are data (entity titles, reasons): shown as they are, never parsed.
                for t in fig.findobj(Text):
                    t.set_parse_math(False)
                    t.set_usetex(False)
                fig.tight_layout()
                fig.savefig(buf, format="png", dpi=100)
        except Exception as e:  # noqa: BLE001 - a plot that cannot be drawn is left out, the card stands
            log.warning("card: plot %s not drawn (%s: %s)", name, type(e).__name__, e)
            return
        finally:
            plt.close(fig)
        rel = f"{PLOTS_DIR}/{name}.png"
        if "://" not in self.out:
            os.makedirs(os.path.join(self.out, PLOTS_DIR), exist_ok=True)
        with FileSystems.create(f"{self.out}/{rel}") as f:
            f.write(buf.getvalue())
        self.made.append((rel, caption))

    @staticmethod
    def figure(title: str):
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        ax.set_title(title, fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        return fig, ax

    def histogram(self, name, values, title, xlabel, caption, *, threshold=None, threshold_label=None, bins=40):
        fig, ax = self.figure(title)
        self.edges[name] = bin_edges(values, bins, threshold)
        ax.hist(values, bins=self.edges[name], color="#4C72B0")
        if threshold is not None:
            ax.axvline(threshold, color="#C44E52", linestyle="--", label=threshold_label or f"threshold {threshold:g}")
            ax.legend(fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("records")
        self.save(fig, name, caption)

    def bars(self, name, labels, values, title, caption, *, horizontal=False, xlabel="records", colors=None):
        fig, ax = self.figure(title)
        if horizontal:
            fig.set_size_inches(6.4, max(2.4, 0.28 * len(labels) + 1.0))
            ax.barh(range(len(labels)), values, color=colors or "#4C72B0")
            ax.set_yticks(range(len(labels)), [_ellipsis(x, 40) for x in labels], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
            ax.grid(axis="x", alpha=0.3)
        else:
            ax.bar(range(len(labels)), values, color=colors or "#4C72B0")
            ax.set_xticks(range(len(labels)), labels, fontsize=9, rotation=20 if max(len(str(x)) for x in labels) > 10 else 0)
            ax.set_ylabel(xlabel)
        for i, v in enumerate(values):
            if horizontal:
                ax.text(v, i, f" {fmt_number(v)}", va="center", fontsize=8)
            else:
                ax.text(i, v, fmt_number(v), ha="center", va="bottom", fontsize=8)
        self.save(fig, name, caption)


def plain_text():
    """A matplotlib context in which no text is parsed: no math text (`$...$`, which raises
    on a title like `$\\foo{Sydney}$`) and no LaTeX, whatever the user's matplotlibrc says.
    Every Text artist (titles, tick labels, bar labels) created inside it keeps that."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False, "text.usetex": False})


def _ellipsis(text: str, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------- the card


def _front_matter(kind: str, manifest: dict, rows: int, models: list[tuple[str, str]], data_files: Optional[str],
                  features: Optional[list[tuple[str, str]]] = None) -> str:
    title, _ = KINDS.get(kind, (kind, ""))
    tasks = ["image-classification", "image-to-text"] if kind not in ("entity_index", "entity_codes") else ["feature-extraction"]
    lines = [
        "---",
        "# license: the images and captions keep the licenses of the sources they came from;",
        "# set the license that applies to your copy before you publish it.",
        "license: unknown",
        f"pretty_name: entityforge {title.lower()}",
        "size_categories:",
        f"- {size_category(rows)}",
        "task_categories:",
        *[f"- {t}" for t in tasks],
        "tags:",
        "- entityforge",
        "- visual-entity-recognition",
        "- oven",
        "- wikipedia",
    ]
    sources = source_corpora(manifest)
    if sources:
        lines += ["source_datasets:", *[f"- {json.dumps(s)}" for s in sources]]
    if models:
        lines += ["entityforge_models:", *[f"  {k}: {json.dumps(v)}" for k, v in models]]
    prompts = manifest.get("prompts")
    if isinstance(prompts, dict) and prompts:
        lines += ["entityforge_prompts:", *[f"  {k}: {json.dumps(_prompt_version(v))}" for k, v in sorted(prompts.items())]]
    if data_files:
        lines += ["configs:", "- config_name: default", "  data_files:", "  - split: train", f"    path: {json.dumps(data_files)}"]
    if data_files and features:
        # The columns' types for `datasets` and the Hub: `image` is declared an Image, so
        # `load_dataset(<folder>)` decodes it to a PIL image and the Hub's viewer shows it;
        # the Parquet column itself stays plain bytes for pyarrow, DuckDB and the trainer.
        lines += ["dataset_info:", "  features:"]
        for name, dtype in features:
            lines += [f"  - name: {json.dumps(name)}", f"    dtype: {dtype}"]
    lines.append("---")
    return "\n".join(lines)


def _prompt_version(v) -> str:
    if isinstance(v, dict):
        return str(v.get("version") or v.get("name") or v.get("sha256") or json.dumps(v, sort_keys=True))
    return str(v)


def source_corpora(manifest: dict, depth: int = 6) -> list[str]:
    """The corpora at the start of the chain that made this output: each input that is an
    entityforge output (a folder with manifest.json) is followed to its own inputs."""
    from apache_beam.io.filesystems import FileSystems

    from transforms.formats.files import read_json

    found = []
    for name in _source_names(manifest):
        if not name:
            continue
        folder = name.rsplit("/", 1)[0] if "/" in name else "."
        upstream = None
        if depth > 0:
            try:
                if FileSystems.exists(f"{folder}/manifest.json"):
                    upstream = read_json(f"{folder}/manifest.json")
            except Exception:  # noqa: BLE001 - unreadable: the input is the source
                upstream = None
        found += source_corpora(upstream, depth - 1) if upstream and _source_names(upstream) else [name]
    return sorted(set(found))


def _source_names(manifest: dict) -> list[str]:
    inputs = manifest.get("inputs")
    if isinstance(inputs, dict):
        if "pattern" in inputs:
            return [str(inputs["pattern"])]
        return [v for k, v in sorted(inputs.items()) if isinstance(v, str) and k != "codes"]
    if isinstance(inputs, list):
        return [str(x) for x in inputs[:5]]
    if isinstance(inputs, str):
        return [inputs]
    return []


def models_used(manifest: dict) -> list[tuple[str, str]]:
    found = []
    opts = manifest.get("options") or {}
    model = manifest.get("model")
    if isinstance(model, str) and manifest.get("kind") != "model":
        found.append(("text_encoder" if manifest.get("kind") == "entity_index" else "llm", model))
    elif isinstance(model, dict):
        found.append(("model", json.dumps(model, sort_keys=True)))
    index_manifest = manifest.get("entity_index_manifest")
    if isinstance(index_manifest, dict) and index_manifest.get("model"):
        found.append(("text_encoder", str(index_manifest["model"])))
    clip = manifest.get("clip")
    if isinstance(clip, dict):
        found.append(("clip", f"{clip.get('model')} ({clip.get('pretrained')})"))
    if manifest.get("kind") == "entity_codes" and manifest.get("tokenizer"):
        found.append(("tokenizer", str(manifest["tokenizer"])))
    if manifest.get("kind") == "model" and manifest.get("model") == "wikiclip":
        found.append(("architecture", f"WikiCLIP-style adaptor over CLIP {opts.get('clip_model')} ({opts.get('clip_pretrained')}) "
                                      f"and {opts.get('text_encoder')}"))
    elif manifest.get("kind") == "model":
        found.append(("architecture", f"GIT ({opts.get('model_config', '?')}, init {opts.get('init', '?')})"))
    if manifest.get("backend"):
        found.append(("llm_backend", str(manifest["backend"])))
    if manifest.get("rew_requests") in (1, 2):
        found.append(("rew_requests", "1 (verdict and rationale in one answer)" if manifest["rew_requests"] == 1
                      else "2 (verify, then rationale + QA)"))
    escalate = (manifest.get("backends") or {}).get("escalate")
    if isinstance(escalate, dict):
        share = (manifest.get("escalation") or {}).get("escalated_share")
        found.append(("llm_escalation", f"{escalate.get('model')} ({escalate.get('backend')})"
                      + (f", {100 * share:.1f} % of samples escalated" if isinstance(share, (int, float)) else "")))
    return found


class Card:
    """Collects the sections of one card."""

    def __init__(self):
        self.sections: list[str] = []

    def add(self, heading: str, *parts: str) -> None:
        body = "\n\n".join(p for p in parts if p)
        self.sections.append(f"## {heading}\n\n{body}" if body else f"## {heading}")


def write_card(out: str, manifest: Optional[dict] = None, *, max_rows: int = MAX_ROWS, viewer_records: int = 300,
               viewer_rejects: int = MAX_REJECTS) -> dict:
    """Write `<out>/README.md`, `<out>/plots/*.png` and `<out>/viewer.html` for a finished
    output directory. Returns {"card", "plots", "viewer"} (paths). Every table cell from
    data is escaped (md_text), every plot label is plain text (plain_text)."""
    with plain_text():
        return _write_card(out, manifest, max_rows=max_rows, viewer_records=viewer_records, viewer_rejects=viewer_rejects)


def _write_card(out: str, manifest: Optional[dict], *, max_rows: int, viewer_records: int, viewer_rejects: int) -> dict:
    from apache_beam.io.filesystems import FileSystems

    from transforms.formats.files import read_json

    out = out.rstrip("/")
    if manifest is None:
        manifest = read_json(f"{out}/manifest.json")
    kind = manifest.get("kind", "?")
    counters = manifest.get("counters") or {}
    title, what = KINDS.get(kind, (kind, "an entityforge output"))
    plots = Plots(out)
    card = Card()
    files = parquet_files(out, manifest)
    rows_total = sum(r for _, r in files)
    sample_table, sample_rows = None, 0
    if files:
        sample_table, sample_rows, rows_total = read_sample(
            files, ["key", "qid", "title", "score", "max_eval_similarity", "verdict", "changed", "grounding_method",
                    "candidate_qid", "candidate_title"], max_rows)
    sampled = sample_rows < rows_total
    of_what = f" (sample of {sample_rows:,} of {rows_total:,} rows)" if sampled else ""

    # -- what it is and how it was made
    intro = [f"{what[0].upper()}{what[1:]}. Written by entityforge `{manifest.get('code_version', '?')}` "
             f"on {manifest.get('created', '?')} in {fmt_number(manifest.get('seconds', 0))} s; count check: "
             f"**{manifest.get('count_check', '?')}**."]
    if files or kind in ("decontaminated_shards", "rew_shards", "candidates"):
        intro.append("Browse a sample of the records and the rejects in [viewer.html](viewer.html) "
                     "(a self-contained page: open it from the file system).")
    models = models_used(manifest)
    data_files, features = None, None
    if files:
        data_files = _data_files_pattern([p for p, _ in files], out)
        features = hf_features(files[0][0])

    # -- per kind
    if kind == "entity_index":
        rows_total = int(manifest.get("num_entities", 0))
        _entity_index_section(card, plots, out, manifest)
    elif kind == "entity_codes":
        rows_total = int(manifest.get("entities", 0))
        _codes_section(card, plots, manifest)
    elif kind == "model":
        rows_total = int(manifest.get("samples", 0))
        _model_section(card, plots, out, manifest)
    if sample_table is not None and sample_table.num_rows:
        _records_section(card, plots, out, manifest, sample_table, of_what)

    # -- counts and rejects (exact, from the manifest)
    rejects = reject_counts(out, counters)
    if rejects:
        card.add(
            "Rejects by reason",
            "Every record that did not make it is in `rejected/<stage>/rejects-*.jsonl` with its reason, "
            "a detail and the record itself; the rows below are the manifest's counters.",
            md_table(["stage", "reason", "records"], [[s, r, fmt_number(n)] for s, r, n in rejects]),
        )
        plots.bars("rejects", [f"{s} / {r}" for s, r, _ in rejects], [n for _, _, n in rejects], "Rejects by reason",
                   "Rejected records by stage and reason.", horizontal=True)
    audit = _read_audit(out)
    if audit:
        card.add("Audit", *_audit_parts(audit))
    if models:
        card.add("Models and prompts", md_table(["role", "model"], [[k, md_code(v)] for k, v in models])
                 + _prompts_table(manifest))
    if counters:
        shown = {k: v for k, v in sorted(counters.items()) if not k.startswith("shuffle_")}
        card.add("Counts", "All counters of the run (`manifest.json: counters`); the run checked that they add up.",
                 md_table(["counter", "value"], [[md_code(k), fmt_number(v)] for k, v in shown.items()]))
    file_rows = []
    for entry in manifest.get("files") or []:
        if isinstance(entry, dict):
            for f in entry.get("files", []):
                file_rows.append([md_code(f["path"]), entry.get("format", ""), fmt_number(int(f.get("rows", 0))), _bytes(int(f.get("bytes", 0)))])
    if file_rows:
        card.add("Files", md_table(["file", "format", "rows", "size"], file_rows[:50])
                 + (f"\n\n… and {len(file_rows) - 50:,} more (all in `manifest.json: files`)." if len(file_rows) > 50 else ""))
    if data_files:
        if features:
            card.add("Loading it", "```python\nimport datasets\nds = datasets.load_dataset(\"<this folder>\", split=\"train\")\n"
                     "ds[0][\"image\"]  # a PIL image: this card declares the column an Image\n```\n\n"
                     f"(`datasets.load_dataset(\"parquet\", data_files=\"{data_files}\")` reads the same rows without the "
                     "card, `image` as bytes; so do pyarrow and DuckDB), or stream it into training with "
                     "`python -m trainer.train --train <this folder>` (Parquet, TFRecord or webdataset shards).")
        else:
            card.add("Loading it", "```python\nimport datasets\nds = datasets.load_dataset(\"parquet\", data_files="
                     f"\"{data_files}\", split=\"train\")\n```\n\nor stream it into training with "
                     "`python -m trainer.train --train <this folder>` (Parquet, TFRecord or webdataset shards).")
    options = manifest.get("options")
    if isinstance(options, dict) and options:
        card.add("Options of the run", md_table(["option", "value"], [[md_code(f"--{k}"), md_code(_short(v))] for k, v in sorted(options.items())]))

    plot_md = "\n\n".join(f"![{cap}]({rel})\n\n*{cap}*" for rel, cap in plots.made)
    text = "\n\n".join(
        [_front_matter(kind, manifest, rows_total, models, data_files, features), f"# {title}", *intro]
        + ([f"## Plots\n\n{plot_md}"] if plot_md else [])
        + card.sections
    ) + "\n"
    with FileSystems.create(f"{out}/{CARD_FILE}") as f:
        f.write(text.encode("utf-8"))
    viewer = write_viewer(out, manifest, files, max_records=viewer_records, max_rejects=viewer_rejects) if (files or kind in KIND_WITH_VIEWER) else None
    return {"card": f"{out}/{CARD_FILE}", "plots": [f"{out}/{rel}" for rel, _ in plots.made], "viewer": viewer,
            "bin_edges": dict(plots.edges)}


KIND_WITH_VIEWER = ("candidates", "decontaminated_shards", "rew_shards", "oven_shards")


def _short(v, width: int = 80) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# Arrow types -> the `dtype` of a Hugging Face `datasets` Value feature.
_HF_DTYPES = {"string": "string", "large_string": "large_string", "binary": "binary", "large_binary": "large_binary",
              "bool": "bool", "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8",
              "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "halffloat": "float16", "float": "float32",
              "double": "float64"}


def hf_features(path: str) -> Optional[list[tuple[str, str]]]:
    """(column, dtype) of a Parquet shard for the card's `dataset_info.features`, with the
    bytes column `image` declared `image`. None when the shard has no `image` column or a
    column of a type this does not map (then nothing is declared and `datasets` infers the
    types itself, the image as bytes)."""
    import pyarrow.parquet as pq

    try:
        with open_read(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (OSError, ValueError):
        return None
    found = []
    for field in schema:
        dtype = _HF_DTYPES.get(str(field.type))
        if dtype is None:
            return None
        found.append((field.name, "image" if field.name == "image" and dtype in ("binary", "large_binary") else dtype))
    return found if ("image", "image") in found else None


def _data_files_pattern(paths: list[str], out: str) -> str:
    rel = [p[len(out) + 1:] if p.startswith(out + "/") else p for p in paths]
    if len(rel) == 1:
        return rel[0]
    return re.sub(r"-\d{5}-of-", "-*-of-", rel[0])


def _prompts_table(manifest: dict) -> str:
    prompts = manifest.get("prompts")
    if not isinstance(prompts, dict) or not prompts:
        return ""
    return "\n\n" + md_table(["prompt", "version"], [[k, md_code(_prompt_version(v))] for k, v in sorted(prompts.items())])


def _records_section(card: Card, plots: Plots, out: str, manifest: dict, table, of_what: str) -> None:
    cols = set(table.column_names)
    n = table.num_rows
    if "score" in cols:
        scores = [s for s in table.column("score").to_pylist() if s is not None]
        if scores:
            opts = manifest.get("options") or {}
            plots.histogram("retrieval_score", scores, f"Caption-to-title retrieval score{of_what}", "cosine similarity",
                            "Retrieval score of each kept image for its entity (caption embedding vs title embedding).",
                            threshold=opts.get("min_score") if isinstance(opts.get("min_score"), (int, float)) else None,
                            threshold_label="--min_score")
    if "qid" in cols:
        per_entity = Counter(table.column("qid").to_pylist())
        titles = dict(zip(table.column("qid").to_pylist(), table.column("title").to_pylist())) if "title" in cols else {}
        counts = sorted(per_entity.values(), reverse=True)
        fig, ax = plots.figure(f"Images per entity, busiest first{of_what}")
        ax.plot(range(1, len(counts) + 1), counts, color="#4C72B0")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("entity rank")
        ax.set_ylabel("images (log)")
        plots.save(fig, "images_per_entity", "Images per entity, entities ranked by their count (log-log: the long tail).")
        top = per_entity.most_common(TOP_ENTITIES)
        card.add(
            "Most frequent entities",
            f"{len(per_entity):,} entities in {n:,} records{of_what}; mean {n / max(1, len(per_entity)):.2f}, "
            f"median {counts[len(counts) // 2]} records per entity.",
            md_table(["entity", "QID", "records"], [[titles.get(q, ""), q, fmt_number(c)] for q, c in top]),
        )
        plots.bars("top_entities", [f"{titles.get(q, q)}" for q, _ in top], [c for _, c in top],
                   f"Most frequent entities{of_what}", "The entities with the most records.", horizontal=True)
    if "max_eval_similarity" in cols:
        kept = [s for s in table.column("max_eval_similarity").to_pylist() if s is not None]
        threshold = manifest.get("threshold") if manifest.get("kind") == "decontaminated_shards" else None
        dropped = []
        if threshold is not None:
            for r in read_rejects(out, "decontaminate", limit=max(10_000, len(kept))):
                try:
                    dropped.append(float(json.loads(r.get("record_json") or "{}").get("similarity")))
                except (TypeError, ValueError):
                    continue
        if kept or dropped:
            fig, ax = plots.figure(f"Highest cosine to any evaluation image{of_what}")
            # Dropped means cosine > threshold: the threshold is a bin edge, so no dropped
            # image is drawn left of its line and no kept one right of it.
            edges = plots.edges["decontamination"] = bin_edges(kept + dropped, 40, threshold)
            if kept:
                ax.hist(kept, bins=edges, color="#4C72B0", label=f"kept ({len(kept):,})")
            if dropped:
                ax.hist(dropped, bins=edges, color="#DD8452", label=f"dropped ({len(dropped):,})")
            if threshold is not None:
                ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"--threshold {threshold:g}")
            ax.set_xlabel("CLIP cosine to the nearest evaluation image")
            ax.set_ylabel("records")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
            plots.save(fig, "decontamination", "Each image's highest CLIP cosine to the evaluation images; above the "
                       "threshold it was dropped as a near-duplicate.")
    if "verdict" in cols and manifest.get("kind") == "rew_shards":
        counters = manifest.get("counters") or {}
        verdicts = {k[len("verdict_"):]: v for k, v in sorted(counters.items()) if k.startswith("verdict_")}
        if verdicts:
            colors = {"correct": "#55A868", "corrected": "#DD8452", "not_an_entity": "#C44E52"}
            plots.bars("verdicts", list(verdicts), list(verdicts.values()), "LLM verdicts",
                       "What the multimodal LLM said about each candidate label.",
                       colors=[colors.get(k, "#4C72B0") for k in verdicts])
            card.add("LLM verdicts", md_table(["verdict", "samples"], [[k, fmt_number(v)] for k, v in verdicts.items()]))
        grounded = {k[len("grounded_"):]: v for k, v in sorted(counters.items()) if k.startswith("grounded_")}
        methods = Counter(m for m in table.column("grounding_method").to_pylist() if m) if "grounding_method" in cols else Counter()
        if methods:
            plots.bars("grounding_methods", list(methods), list(methods.values()), f"How each label was grounded{of_what}",
                       "How each kept label was matched to a catalog entity: verified (the candidate was confirmed) or, "
                       "for a corrected name, exact, normalized, disambiguation or embedding.")
        if grounded:
            card.add("Grounding of corrected names", md_table(["method", "samples"], [[k, fmt_number(v)] for k, v in grounded.items()]))
        if "changed" in cols:
            changed = sum(1 for c in table.column("changed").to_pylist() if c)
            fig, ax = plots.figure(f"Labels changed by REW{of_what}")
            ax.pie([n - changed, changed], labels=[f"kept {n - changed:,}", f"changed {changed:,}"], colors=["#55A868", "#DD8452"],
                   autopct="%1.1f%%", startangle=90)
            ax.axis("equal")
            plots.save(fig, "changed_labels", "Share of training samples whose entity label REW changed.")


def _entity_index_section(card: Card, plots: Plots, out: str, manifest: dict) -> None:
    search = manifest.get("search") or {}
    rows = [["entities", fmt_number(int(manifest.get("num_entities", 0)))], ["dimension", manifest.get("dimension", "?")],
            ["index", md_code(manifest.get("index_factory", "?"))], ["metric", manifest.get("metric", "?")],
            ["text backend", manifest.get("text_backend", "?")]]
    if search.get("params"):
        rows.append(["search parameters", md_code(json.dumps(search["params"], sort_keys=True))])
    card.add("Index", md_table(["property", "value"], rows))
    curve = search.get("recall_curve")
    if isinstance(curve, list) and curve:
        xs = [c.get("nprobe", c.get("efSearch")) for c in curve]
        ys = [c.get("recall_at_10", c.get("recall")) for c in curve]
        if all(x is not None for x in xs) and all(y is not None for y in ys):
            fig, ax = plots.figure("Recall@10 against exact search")
            ax.plot(xs, ys, marker="o")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("nprobe / efSearch")
            ax.set_ylabel("recall@10")
            plots.save(fig, "recall_curve", "Recall@10 of the index against exact search for each search setting.")
    try:
        import pyarrow.parquet as pq

        with open_read(f"{out}/entities.parquet") as f:
            titles = pq.read_table(f, columns=["title"]).column("title").to_pylist()[:MAX_ROWS]
        plots.histogram("title_length", [len(t) for t in titles], "Title length", "characters",
                        "Length of the entity titles the index embeds.")
    except Exception as e:  # noqa: BLE001 - a card never fails a run
        log.warning("card: entity titles not read: %s", e)


def _codes_section(card: Card, plots: Plots, manifest: dict) -> None:
    hist = manifest.get("name_tokens_per_code_histogram") or {}
    methods = manifest.get("methods") or {}
    card.add("Codes", md_table(["property", "value"], [
        ["entities", fmt_number(int(manifest.get("entities", 0)))], ["strategy", manifest.get("strategy", "?")],
        ["code length (EOS included)", manifest.get("code_length", "?")], ["unique", manifest.get("unique", "?")],
        ["random fallbacks", f"{100 * float(manifest.get('random_fallback_share') or 0):.2f} %"],
    ]), md_table(["method", "entities"], [[k, fmt_number(v)] for k, v in sorted(methods.items())]))
    if hist:
        plots.bars("name_tokens_per_code", list(hist), list(hist.values()), "Name tokens per code",
                   "How many of each code's tokens come from the entity's name.", xlabel="entities")


def _model_section(card: Card, plots: Plots, out: str, manifest: dict) -> None:
    card.add("Training", md_table(["property", "value"], [
        ["steps", fmt_number(int(manifest.get("steps", 0)))], ["samples", fmt_number(int(manifest.get("samples", 0)))],
        ["parameters", fmt_number(int(manifest.get("parameters", 0)))],
        ["loss first -> last", Md(f"{manifest.get('first_loss', 0):.3f} -> {manifest.get('last_loss', 0):.3f}")],
        ["samples/s", fmt_number(float(manifest.get("samples_per_s", 0)))],
        ["skipped samples", fmt_number(int(manifest.get("skipped_total", 0)))],
        ["checkpoint", md_code(manifest.get("checkpoint", "?"))],
    ]))
    log_rows = []
    try:
        with open_read(f"{out}/train_log.jsonl") as f:
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                if line.strip():
                    log_rows.append(json.loads(line))
    except Exception:  # noqa: BLE001 - no log
        pass
    if log_rows:
        fig, ax = plots.figure("Training loss")
        ax.plot([r["step"] for r in log_rows], [r["loss"] for r in log_rows], label="total", color="#4C72B0")
        tasks = sorted({t for r in log_rows for t in (r.get("task_loss") or {})})
        for t in tasks:
            ax.plot([r["step"] for r in log_rows if t in (r.get("task_loss") or {})],
                    [r["task_loss"][t] for r in log_rows if t in (r.get("task_loss") or {})], label=t, alpha=0.7)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        plots.save(fig, "loss", "Training loss per logged step (total and per task).")


def write_card_safely(out: str, manifest: dict) -> Optional[dict]:
    """The output's dataset card and viewer. A card is a report: when
    it cannot be drawn the run still stands, with a warning that says how to redraw it."""
    try:
        return write_card(out, manifest)
    except Exception as e:  # noqa: BLE001
        log.warning("the dataset card of %s could not be written (%s: %s); the data is complete. "
                    "Redraw it with: python -m pipelines.card %s", out, type(e).__name__, e, out)
        return None


def _read_audit(out: str) -> Optional[dict]:
    from transforms.formats.files import read_json

    try:
        return read_json(f"{out}/audit/results.json")
    except Exception:  # noqa: BLE001 - no audit yet
        return None


def _audit_parts(results: dict) -> list[str]:
    """The Audit section of an output's card, from `<out>/audit/results.json`
    (`pipelines.audit DIR --judgments FILE`)."""

    def row(name, v):
        if not v:
            return None
        return [md_text(name), f"{100 * v['precision']:.1f} %", f"{100 * v['low']:.1f}-{100 * v['high']:.1f} %", str(v["judged"])]

    parts = [f"{results['judged']} of the {results['sample']} sampled records judged by "
             f"{', '.join(md_text(r) for r in results['reviewers']) or 'nobody'} ({results['unsure']} unsure, left out); "
             "precisions re-weighted to the whole output by the sample's strata, with Wilson 95 % intervals "
             "(`python -m pipelines.audit DIR --judgments FILE`)."]
    for group, title in (("overall", "overall"), ("verdict", "by verdict"), ("grounding_method", "by grounding method"),
                         ("score_bucket", "by retrieval score"), ("rejection_reason", "rejects, by reason")):
        rows = [r for r in (row(k, v) for k, v in results["precision"][group].items()) if r]
        if rows:
            parts.append(f"**{title}**\n\n" + md_table(["group", "precision", "95 % interval", "judged"], rows))
    if results["agreement"]:
        parts.append("**reviewers' agreement**\n\n" + md_table(["reviewers", "records", "agreement", "kappa"], [
            [md_text(" / ".join(a["reviewers"])), str(a["records"]), f"{100 * a['agreement']:.1f} %",
             "-" if a["kappa"] is None else f"{a['kappa']:.3f}"] for a in results["agreement"]]))
    return parts
