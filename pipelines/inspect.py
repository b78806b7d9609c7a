"""Summarise an entityforge output directory in the terminal.

    python -m pipelines.inspect DIR [--rows 3]

* A pipeline output (a folder with `manifest.json`): what wrote it and when, the count
  check, the counters and shuffles, the files it wrote with their rows (from the
  manifest, no data is read for them), rejects by stage and reason, the schema of its
  first Parquet shard and its first rows (image bytes shown as their size).
* A model folder (trainer.train's `--output`): steps, samples, loss first -> last,
  throughput, skipped samples, the newest checkpoint with its configuration, and the
  entity codes it decodes to (count, length, examples).
* Any other folder (the demo's, say): one line for each output or model folder inside it.

Everything printed passes through `transforms.formats.text.printable`: the files hold web
text, and a control or bidirectional character in a caption, title, reject reason or
file name is shown as an escape (`\\x1b`, `\\u202e`), never sent to the terminal.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Optional

from transforms.formats.text import printable
from transforms.run.cli import Parser

MANIFEST = "manifest.json"
TRAIN_SUMMARY = "train_summary.json"


def build_parser() -> Parser:
    p = Parser("pipelines.inspect", __doc__.split("\n\n")[0])
    p.add_argument("dir", help="an output directory of any entityforge command (local path)")
    p.add_argument("--rows", type=int, default=3, help="rows of the first shard to show")
    return p


def _load(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _short(value, width: int = 70) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value):,} bytes>"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _number(v) -> str:
    return f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else str(v))


def reject_reasons(folder: str) -> Counter:
    counts: Counter = Counter()
    for path in glob.glob(os.path.join(folder, "rejected", "*", "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    counts[(r.get("stage", "?"), r.get("reason", "?"))] += int(r.get("count", 1) or 1)
    return counts


def describe_output(folder: str, manifest: dict, rows: int) -> list[str]:
    import pyarrow.parquet as pq

    out = [f"{folder}: {manifest.get('kind', '?')} (created {manifest.get('created', '?')}, "
           f"{_number(manifest.get('seconds', '?'))} s, code {manifest.get('code_version', '?')})",
           f"count check: {manifest.get('count_check', '?')}"]
    counters = {k: v for k, v in manifest.get("counters", {}).items() if not k.startswith("shuffle_")}
    if counters:
        width = max(len(k) for k in counters)
        out.append("counters:")
        out += [f"  {k:<{width}}  {_number(v):>12}" for k, v in sorted(counters.items())]
    shuffles = manifest.get("shuffles", {})
    if shuffles:
        out.append("shuffles (elements, bytes):")
        out += [f"  {k:<24} {_number(v.get('elements', 0)):>12} {_number(v.get('bytes', 0)):>16}" for k, v in shuffles.items()]
    first_parquet = None
    for group in manifest.get("files", []) if isinstance(manifest.get("files"), list) else []:
        if not isinstance(group, dict):
            continue
        files = group.get("files", [])
        rows_total = sum(int(f.get("rows", 0) or 0) for f in files)
        size = sum(int(f.get("bytes", 0) or 0) for f in files)
        out.append(f"written: {group.get('name', '?')} ({group.get('format', '?')}): {len(files)} files, "
                   f"{rows_total:,} rows, {size / 2**20:,.1f} MiB")
        if group.get("format") == "parquet" and first_parquet is None:
            nonempty = [f for f in files if f.get("rows")]
            if nonempty:
                first_parquet = os.path.join(folder, nonempty[0]["path"])
    if first_parquet is None:
        found = sorted(glob.glob(os.path.join(folder, "*.parquet")))
        first_parquet = found[0] if found else None
    rejects = reject_reasons(folder)
    if rejects:
        out.append("rejects (stage / reason):")
        out += [f"  {s} / {r}: {n:,}" for (s, r), n in sorted(rejects.items())]
    if first_parquet:
        f = pq.ParquetFile(first_parquet)
        out.append(f"schema of {os.path.basename(first_parquet)} ({f.metadata.num_rows:,} rows):")
        out += [f"  {field.name}: {field.type}" for field in f.schema_arrow]
        if rows > 0 and f.metadata.num_rows:
            table = f.read_row_group(0).slice(0, rows).to_pylist()
            for i, row in enumerate(table):
                out.append(f"row {i}:")
                out += [f"  {k}: {_short(v)}" for k, v in row.items() if v not in (None, "", [], {})]
    return out


def describe_model(folder: str, summary: dict) -> list[str]:
    out = [f"{folder}: model (trainer.train)"]
    log_path = os.path.join(folder, "train_log.jsonl")
    log = []
    if os.path.exists(log_path):
        with open(log_path, encoding="utf-8") as f:
            log = [json.loads(line) for line in f if line.strip()]
    out.append(f"steps {summary.get('steps', '?')}, samples {_number(summary.get('samples', '?'))}, "
               f"loss {_number(summary.get('first_loss', '?'))} -> {_number(summary.get('last_loss', '?'))}, "
               f"{_number(summary.get('samples_per_s', '?'))} samples/s, {summary.get('world_size', 1)} process(es)")
    if log:
        out.append(f"log: {len(log)} lines, steps {log[0].get('step')}..{log[-1].get('step')}, "
                   f"last lr {_number(log[-1].get('lr', '?'))}")
    if summary.get("skipped_total"):
        out.append(f"skipped samples: {summary['skipped_total']:,} {summary.get('skipped', {})}")
    ckpt = summary.get("checkpoint")
    if ckpt and not os.path.isabs(ckpt):
        ckpt = os.path.join(folder, ckpt)
    if ckpt and os.path.isdir(ckpt):
        out.append(f"checkpoint: {ckpt}")
        config = _load(os.path.join(ckpt, "train_config.json")) or {}
        keys = ("model_config", "entity_target", "stage", "init", "max_steps", "batch_size", "lr", "precision")
        out.append("  " + ", ".join(f"{k}={config[k]}" for k in keys if k in config))
        codes = os.path.join(ckpt, "codes.parquet")
        if os.path.exists(codes):
            import pyarrow.parquet as pq

            table = pq.read_table(codes)
            out.append(f"  codes: {table.num_rows:,} entities; columns {', '.join(table.column_names)}")
            for row in table.slice(0, 3).to_pylist():
                out.append("    " + ", ".join(f"{k}={_short(v, 40)}" for k, v in row.items()))
    return out


def describe(folder: str, rows: int = 3) -> str:
    """The summary as terminal-safe text: each line is made printable on its own, so a data
    string can neither hold a control character nor start a line of its own."""
    return "\n".join(printable(line) for line in _describe(folder, rows))


def _describe(folder: str, rows: int) -> list[str]:
    folder = folder.rstrip("/") or "/"
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such directory")
    manifest = _load(os.path.join(folder, MANIFEST))
    summary = _load(os.path.join(folder, TRAIN_SUMMARY))
    if manifest is not None and manifest.get("kind") != "model":
        return describe_output(folder, manifest, rows)
    if summary is not None:
        return describe_model(folder, summary)
    lines = [f"{folder}: not an output itself; the outputs in it:"]
    for sub in sorted(os.listdir(folder)):
        path = os.path.join(folder, sub)
        m = _load(os.path.join(path, MANIFEST))
        s = _load(os.path.join(path, TRAIN_SUMMARY))
        if m is not None and m.get("kind") != "model":
            groups = [g for g in m.get("files", []) if isinstance(g, dict)] if isinstance(m.get("files"), list) else []
            written = sum(int(f.get("rows", 0) or 0) for g in groups for f in g.get("files", []))
            what = f"{written:>10,} rows written" if groups else f"{'':>10} (no shard list)"
            lines.append(f"  {sub + '/':<20} {m.get('kind', '?'):<24} {what}, "
                         f"count check: {_short(m.get('count_check', '?'), 40)}")
        elif s is not None:
            lines.append(f"  {sub + '/':<20} {'model':<24} {s.get('steps', '?'):>10} steps, "
                         f"loss {_number(s.get('first_loss', '?'))} -> {_number(s.get('last_loss', '?'))}")
    if len(lines) == 1:
        lines.append("  (none: no manifest.json or train_summary.json here or one level down)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(describe(args.dir, args.rows))
    except FileNotFoundError as e:
        print(printable(f"error: {e}"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
