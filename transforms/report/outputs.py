"""Reading an output folder as its manifest lists it: its Parquet shards (a sample of rows,
spread over the files, bounded at any scale), its rejects and their counts by stage and
reason. Used by the card, the viewer and the demo; reads only, draws nothing."""

from __future__ import annotations

import io
import json
from typing import Optional

from transforms.formats.files import open_read

MAX_ROWS = 200_000


def parquet_files(out: str, manifest: dict) -> list[tuple[str, int]]:
    """(path, rows) of the output's Parquet shards, from the manifest's file list."""
    found = []
    for entry in manifest.get("files") or []:
        if isinstance(entry, dict) and entry.get("format") == "parquet":
            found += [(f"{out}/{f['path']}", int(f.get("rows", 0))) for f in entry.get("files", [])]
    return found


def read_sample(files: list[tuple[str, int]], columns: list[str], max_rows: int = MAX_ROWS):
    """The given columns (those the files have) of at most ~max_rows rows, from files spread
    evenly over the list. Returns (pyarrow.Table or None, rows_in_sample, rows_total)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = sum(r for _, r in files)
    if not files:
        return None, 0, 0
    if total > max_rows:
        # Every k-th file, so the sample spans the output (shards are written in no order
        # that matters, but a spread also spans a run's inputs).
        mean = max(1, total // len(files))
        want = min(len(files), -(-max_rows // mean))
        files = [files[i * len(files) // want] for i in range(want)]
    tables, n = [], 0
    for path, _ in files:
        with open_read(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(columns=cols, batch_size=65_536):
                tables.append(pa.Table.from_batches([batch]))
                n += batch.num_rows
                if n >= max_rows:
                    break
        if n >= max_rows:
            break
    if not tables:
        return None, 0, total
    table = pa.concat_tables(tables, promote_options="default")
    return table.slice(0, max_rows), min(n, max_rows), total


def reject_counts(out: str, counters: dict) -> list[tuple[str, str, int]]:
    """(stage, reason, records) from the manifest counters `rejected_<stage>_<reason>`;
    the stage is told apart from the reason by the `rejected/<stage>/` folders and the
    stages this project knows."""
    from transforms.io.writers import KNOWN_STAGES

    stages = set(KNOWN_STAGES)
    try:
        from apache_beam.io.filesystems import FileSystems

        for m in FileSystems.match([f"{out}/rejected/*/*"])[0].metadata_list:
            stages.add(m.path.rstrip("/").split("/")[-2])
    except Exception:  # noqa: BLE001 - no rejects folder
        pass
    rows = []
    for key, value in sorted(counters.items()):
        if not key.startswith("rejected_") or key.endswith("_files") or not value:
            continue
        rest = key[len("rejected_"):]
        stage = max((s for s in stages if rest.startswith(s + "_")), key=len, default=None)
        if stage is None:
            stage, reason = "?", rest
        else:
            reason = rest[len(stage) + 1:]
        rows.append((stage, reason, int(value)))
    return rows


def read_rejects(out: str, stage: Optional[str] = None, limit: int = 1000) -> list[dict]:
    """Up to `limit` reject lines of the output (of one stage), read in file order."""
    from apache_beam.io.filesystems import FileSystems

    pattern = f"{out}/rejected/{stage or '*'}/rejects-*.jsonl"
    try:
        paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception:  # noqa: BLE001
        return []
    found = []
    for path in paths:
        with open_read(path) as f:
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                if line.strip():
                    found.append(json.loads(line))
                    if len(found) >= limit:
                        return found
    return found
