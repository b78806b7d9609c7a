"""Reading an output folder as its manifest lists it: its Parquet shards (a sample of rows,
spread over the files, bounded at any scale), its rejects and their counts by stage and
reason. Used by the card, the viewer and the demo; reads only, draws nothing."""

from __future__ import annotations

import io
import json
from typing import Optional

from transforms.formats.files import open_read
from transforms.schema import KNOWN_STAGES

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


def image_sources(dirs: list[str], own: bool = True) -> list[str]:
    """Parquet files that may hold the images of outputs' records: each output's own shards
    (unless `own` is False), then the Parquet inputs its manifest lists (a reject's image is
    in the input it came from)."""
    paths: list[str] = []
    for d in dirs:
        d = d.rstrip("/")
        try:
            with open_read(f"{d}/manifest.json") as f:
                manifest = json.load(f)
        except Exception:  # noqa: BLE001 - no manifest: nothing to look in
            continue
        if own:
            paths += [p for p, _ in parquet_files(d, manifest)]
        paths += [p for p in (manifest.get("inputs") or {}).get("listed") or [] if str(p).endswith(".parquet")]
    return paths


def thumbnails(paths: list[str], keys: set[str], side: int, max_files: int = 64) -> dict[str, str]:
    """key -> `data:` URL of a JPEG of at most `side` px (through the guarded decoder), for
    `keys`, from the first of `paths` (Parquet with `key` and `image`) holding each. Only the
    row groups holding a wanted key are read, and of them only those rows' images; at most
    `max_files` files are looked in (a card at the end of a web-scale run stays cheap: a key
    not found by then has no thumbnail)."""
    import base64

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transforms.io.images import ImageError, image_for_llm

    found: dict[str, str] = {}
    for path in paths[:max_files]:
        want = keys - set(found)
        if not want:
            break
        try:
            with open_read(path) as f:
                pf = pq.ParquetFile(f)
                if not {"key", "image"} <= set(pf.schema_arrow.names):
                    continue
                wanted = pa.array(sorted(want))
                for i in range(pf.num_row_groups):
                    mask = pc.is_in(pf.read_row_group(i, columns=["key"]).column("key"), value_set=wanted)
                    if not pc.any(mask).as_py():
                        continue
                    table = pf.read_row_group(i, columns=["key", "image"]).filter(mask)
                    for key, data in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
                        try:
                            thumb, mime = image_for_llm(data or b"", side)
                        except ImageError:
                            continue
                        found.setdefault(key, f"data:{mime};base64,{base64.b64encode(thumb).decode('ascii')}")
        except OSError:
            continue
    return found
