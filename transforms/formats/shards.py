"""Our own shards (Parquet, TFRecord, webdataset; written by decontaminate and refine) as
one kind of input: the kind of a file by its name, its read units, its records with the
Sample columns, and images read back by location (in shards and in image corpora)."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from transforms.formats import parquet, tfrecord, webdataset
from transforms.formats.files import Skip, open_read

SHARD_KINDS = ("parquet", "tfrecord", "webdataset")


def shard_kind(path: str) -> str:
    """"parquet", "tfrecord", "webdataset", or "" for a file that is none of them."""
    if parquet.is_parquet(path):
        return "parquet"
    if tfrecord.is_tfrecord(path):
        return "tfrecord"
    if webdataset.is_tar(path):
        return "webdataset"
    return ""


def units(path: str) -> list[tuple[str, int]]:
    """Read units of one shard: (path, row group) for Parquet (none for a shard without
    rows), (path, -1) for a whole file. Raises what opening the file raises (an
    unreadable Parquet footer included)."""
    if shard_kind(path) == "parquet":
        with open_read(path) as f:
            return parquet.row_group_units(path, f, visit_empty=False)
    return [(path, -1)]


@dataclass
class ShardRecord:
    """One record of a shard: its columns (`row`, by Sample's names), and where its image
    lies (`ref`, see `read_images_at`) when the image was located instead of read."""

    row: dict
    ref: Optional[str] = None


def _tfrecord_stream(raw, path: str):
    # Local .gz files come decompressed from open_read; remote ones too (Beam's
    # FileSystems decompresses by suffix). Only a .gz stream that still starts with the
    # gzip magic is wrapped.
    stream = io.BufferedReader(raw) if not hasattr(raw, "peek") else raw
    if path.lower().endswith(".gz") and stream.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream)
    return stream


def iter_shard_records(
    unit: tuple[str, int],
    *,
    locate_images: bool = False,
    required: tuple[str, ...] = (),
) -> Iterator[ShardRecord | Skip]:
    """Records of one read unit, in file order, with Skips in place of what cannot be
    used: a TFRecord frame with a bad CRC, a tar sample whose KEY.json does not parse, the
    rest of a damaged tar, a Parquet shard without the `required` columns. I/O errors
    propagate. With `locate_images` Parquet rows are read without their image column and
    tar image members are skipped; each record then carries `ref`."""
    path, rg = unit
    kind = shard_kind(path)
    with open_read(path) as f:
        if kind == "parquet":
            pf = parquet.open_parquet(f)
            names = set(pf.schema_arrow.names)
            lacking = [c for c in required if c not in names]
            if lacking:
                yield Skip("shard_missing_columns", f"{path}: no column {', '.join(lacking)}")
                return
            rows = parquet.read_rows(f, rg, exclude=("image",) if locate_images else ())
            for i, row in enumerate(rows):
                if locate_images:
                    row["image"] = None
                yield ShardRecord(row, f"p:{rg}:{i}" if locate_images else None)
        elif kind == "tfrecord":
            from transforms.formats.tf_example import decode_example
            from transforms.schema import Sample

            columns = [fld for fld in Sample.__dataclass_fields__]
            for item in tfrecord.iter_tfrecord(_tfrecord_stream(f, path)):
                if isinstance(item, Skip):
                    yield item
                    continue
                try:
                    sample = decode_example(item, Sample)
                except (ValueError, TypeError) as e:
                    yield Skip("bad_record", str(e)[:200])
                    continue
                yield ShardRecord({c: getattr(sample, c) for c in columns})
        elif kind == "webdataset":
            samples, damage = webdataset.read_samples(f, path=path, locate_images=locate_images)
            for s in samples:
                if s.refused is not None:
                    yield Skip(s.refused[0], f"{path} {s.key}: {s.refused[1]}"[:300])
                    continue
                if s.bad_json or "json" not in s.parts:
                    yield Skip("bad_json", f"{path} {s.key}: {s.bad_json or 'no KEY.json'}"[:300])
                    continue
                row = dict(s.meta)
                if not row.get("key"):
                    row["key"] = s.key
                ref = None
                if locate_images:
                    ref = s.image.locator() if isinstance(s.image, webdataset.TarMemberRef) else None
                    row["image"] = None
                else:
                    row["image"] = s.image if isinstance(s.image, (bytes, bytearray)) else None
                yield ShardRecord(row, ref)
            if damage is not None:
                yield Skip(webdataset.damage_reason(damage), f"{path}: after {len(samples)} samples: {type(damage).__name__}: {damage}"[:500])
        else:
            yield Skip("unknown_shard_kind", f"{path}: not .parquet, .tfrecord[.gz] or .tar")


def read_images_at(path: str, locators: list[str], image_col: Optional[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """({locator: image bytes}, {locator: why there is none}) for locations in one file.

    `t:<offset>:<size>` are ranged reads of a tar (its member header checked);
    `p:<rg>:<row>` read only the image column of the row groups that hold selected rows.
    A location that holds no image is data (the second dict); I/O errors propagate, so
    the runner retries the work.
    """
    images: dict[str, bytes] = {}
    missing: dict[str, str] = {}
    tar_refs = [x for x in locators if x.startswith("t:")]
    pq_refs = [x for x in locators if x.startswith("p:")]
    if tar_refs:
        with open_read(path) as f:
            for loc in sorted(tar_refs, key=lambda x: int(x.split(":")[1])):
                _, off, size = loc.split(":")
                try:
                    images[loc] = webdataset.read_tar_member(f, webdataset.TarMemberRef(int(off), int(size)))
                except tarfile.TarError as e:
                    missing[loc] = f"{type(e).__name__}: {e}"
    if pq_refs:
        by_rg: dict[int, list[int]] = {}
        for loc in pq_refs:
            _, rg, row = loc.split(":")
            by_rg.setdefault(int(rg), []).append(int(row))
        with open_read(path) as f:
            got, lacking = parquet.read_images(f, by_rg, image_col)
        images.update({f"p:{rg}:{row}": v for (rg, row), v in got.items()})
        missing.update({f"p:{rg}:{row}": v for (rg, row), v in lacking.items()})
    return images, missing


def count_records(path: str) -> int:
    """Records in a finished file, counted from the file itself: Parquet rows (footer),
    TFRecord frames (headers with their length CRCs, payloads skipped), webdataset samples
    (headers only, members skipped), JSON-lines lines. What the accounting compares with what a stage meant to write."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".jsonl.gz", ".txt")):
        with open_read(path) as f:
            n, last = 0, b"\n"
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
            return n + (last != b"\n")
    kind = shard_kind(path)
    with open_read(path) as f:
        if kind == "parquet":
            return parquet.open_parquet(f).metadata.num_rows
        if kind == "tfrecord":
            return tfrecord.count_frames(_tfrecord_stream(f, path))
        if kind == "webdataset":
            return sum(1 for _ in webdataset.iter_webdataset(f, path=path, read_ext=lambda ext: False))
    raise ValueError(f"{path}: cannot count the records of this kind of file")
