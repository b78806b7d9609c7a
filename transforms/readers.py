"""Readers for the formats users already have, robust to bad input.

* Entity catalogs: OVEN Wiki6M JSON lines (plain or gzip) and Parquet.
* Caption corpora: LAION-style metadata Parquet (URL + caption), img2dataset webdataset
  shards (KEY.jpg / KEY.txt / KEY.json in .tar) and Parquet with an image-bytes column
  (img2dataset's parquet output).

Every reader is a DoFn over file paths (local, globs, gs://, anything Beam's FileSystems
opens). A row that cannot be used becomes a `Reject` on the `rejected` output with its
reason; a file that cannot be read becomes one `Reject` for the whole file. Nothing raises.
Parquet files are split by row group so that big LAION files are read in parallel.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from transforms.common import METRICS_NAMESPACE, first_present, maybe_gunzip, open_read
from transforms.schema import Caption, Entity, Reject, truncate_json

log = logging.getLogger(__name__)

REJECTED = "rejected"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
CAPTION_FORMATS = ("laion_parquet", "webdataset", "parquet")


def _counter(name: str):
    return Metrics.counter(METRICS_NAMESPACE, name)


def _is_parquet(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq"))


# --------------------------------------------------------------------------------------
# Entity catalog
# --------------------------------------------------------------------------------------


def _entity_from_obj(obj, file_index: int, row: int, source: str):
    """An Entity, or a (reason, detail) pair when the row is unusable."""
    if not isinstance(obj, dict):
        return ("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    qid = obj.get("wikidata_id")
    title = obj.get("wikipedia_title")
    if qid is None or title is None:
        missing = [k for k in ("wikidata_id", "wikipedia_title") if obj.get(k) is None]
        return ("missing_field", f"missing {', '.join(missing)}")
    if not isinstance(qid, str) or not isinstance(title, str):
        return ("non_text_field", "wikidata_id and wikipedia_title must be strings")
    qid = qid.strip()
    title = title.strip()
    if not qid:
        return ("missing_field", "empty wikidata_id")
    if not title:
        return ("empty_title", "empty wikipedia_title")
    summary = obj.get("wikipedia_summary")
    if summary is not None and not isinstance(summary, str):
        summary = str(summary)
    extra = {
        k: v
        for k, v in obj.items()
        if k not in ("wikidata_id", "wikipedia_title", "wikipedia_summary")
    }
    return Entity(
        qid=qid,
        title=title,
        summary=summary,
        file_index=file_index,
        row=row,
        extra_json=json.dumps(extra, ensure_ascii=False, default=str) if extra else None,
    )


class ReadCatalogFile(beam.DoFn):
    """(file_index, path) -> Entity, with Reject on the `rejected` tag.

    Reads one file sequentially, so row numbers (and the int ids derived from them) follow
    file order.
    """

    STAGE = "read_catalog"

    def __init__(self):
        self.rows = _counter("catalog_rows_read")
        self.ok = _counter("catalog_rows_ok")

    def _reject(self, reason, detail, source, row=None, record=None, count=1):
        return beam.pvalue.TaggedOutput(
            REJECTED,
            Reject(
                stage=self.STAGE,
                reason=reason,
                detail=detail if row is None else f"row {row}: {detail}",
                key=None,
                source=source,
                record_json=None if record is None else truncate_json(record),
                count=count,
            ),
        )

    def process(self, element):
        file_index, path = element
        try:
            if _is_parquet(path):
                yield from self._parquet(file_index, path)
            else:
                yield from self._jsonl(file_index, path)
        except Exception as e:  # noqa: BLE001 - a broken file is a reject, not a crash
            log.warning("catalog file %s unreadable: %s", path, e)
            _counter("catalog_files_unreadable").inc()
            yield self._reject("unreadable_file", f"{type(e).__name__}: {e}", path, count=0)

    def _emit(self, obj, file_index, row, path):
        self.rows.inc()
        got = _entity_from_obj(obj, file_index, row, path)
        if isinstance(got, Entity):
            self.ok.inc()
            return got
        reason, detail = got
        return self._reject(reason, detail, path, row=row, record=obj)

    def _jsonl(self, file_index, path):
        with open_read(path) as raw:
            stream = maybe_gunzip(raw)
            for row, line in enumerate(io.BufferedReader(stream, 1 << 20)):
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.rows.inc()
                    yield self._reject("bad_utf8", str(e), path, row=row, record=repr(line[:200]))
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    self.rows.inc()
                    yield self._reject("bad_json", str(e), path, row=row, record=text[:500])
                    continue
                yield self._emit(obj, file_index, row, path)

    def _parquet(self, file_index, path):
        with open_read(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = [c for c in ("wikidata_id", "wikipedia_title") if c not in names]
            if missing:
                n = pf.metadata.num_rows
                self.rows.inc(n)
                yield self._reject(
                    "missing_column",
                    f"columns {missing} not in {names}",
                    path,
                    count=n,
                )
                return
            row = 0
            for batch in pf.iter_batches(batch_size=8192):
                for obj in batch.to_pylist():
                    yield self._emit(obj, file_index, row, path)
                    row += 1


# --------------------------------------------------------------------------------------
# Caption corpora
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionColumns:
    """Column names of a caption corpus; None = the format's default."""

    text: Optional[str] = None
    url: Optional[str] = None
    key: Optional[str] = None
    image: Optional[str] = None
    keep: tuple[str, ...] = ()

    def defaults(self, fmt: str) -> CaptionColumns:
        if fmt == "laion_parquet":
            return CaptionColumns(
                text=self.text or "TEXT",
                url=self.url or "URL",
                key=self.key or "key",
                image=None,
                keep=self.keep,
            )
        # img2dataset's parquet / webdataset metadata names.
        return CaptionColumns(
            text=self.text or "caption",
            url=self.url or "url",
            key=self.key or "key",
            image=self.image or "jpg",
            keep=self.keep,
        )


def url_key(url: str) -> str:
    """Image identity for corpora without keys: the same URL is the same image."""
    return hashlib.sha1(url.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _clean_caption(value, max_chars: int):
    """(caption, None) or (None, (reason, detail))."""
    if value is None:
        return None, ("empty_caption", "caption is null")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, ("bad_utf8", str(e))
    if not isinstance(value, str):
        return None, ("non_text_caption", f"caption is {type(value).__name__}: {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        # Lone surrogates from a lossy decoder upstream.
        return None, ("bad_utf8", str(e))
    text = " ".join(value.split())
    if not text:
        return None, ("empty_caption", "caption is empty or whitespace")
    if len(text) > max_chars:
        return None, ("caption_too_long", f"{len(text)} chars > --max_caption_chars {max_chars}")
    return text, None


def _int_or_none(v) -> Optional[int]:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        return None
    return v


class _CaptionReaderBase(beam.DoFn):
    STAGE = "read_captions"

    def __init__(self, columns: CaptionColumns, max_caption_chars: int):
        self.columns = columns
        self.max_caption_chars = max_caption_chars
        self.rows = _counter("captions_rows_read")
        self.ok = _counter("captions_rows_ok")

    def _reject(self, reason, detail, source, key=None, record=None, count=1):
        return beam.pvalue.TaggedOutput(REJECTED, Reject.of(self.STAGE, reason, detail, key, source, record, count))

    def _caption(self, *, key, url, text, source, width=None, height=None, meta=None, record):
        self.rows.inc()
        caption, err = _clean_caption(text, self.max_caption_chars)
        if err:
            return self._reject(err[0], err[1], source, key=key, record=record)
        if url is not None and not isinstance(url, str):
            url = str(url)
        if not key:
            if not url:
                return self._reject(
                    "missing_key", "row has neither a key nor a URL", source, record=record
                )
            key = url_key(url)
        self.ok.inc()
        return Caption(
            key=str(key),
            url=url,
            caption=caption,
            source=source,
            width=_int_or_none(width),
            height=_int_or_none(height),
            meta_json=json.dumps(meta, ensure_ascii=False, default=str) if meta else None,
        )


class SplitParquet(beam.DoFn):
    """path -> (path, row_group) work items, so one big file is read by many workers."""

    def process(self, path):
        try:
            with open_read(path) as f:
                n = pq.ParquetFile(f).metadata.num_row_groups
        except Exception as e:  # noqa: BLE001
            _counter("captions_files_unreadable").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                Reject(
                    stage="read_captions",
                    reason="unreadable_file",
                    detail=f"{type(e).__name__}: {e}",
                    source=path,
                    count=0,
                ),
            )
            return
        for rg in range(max(n, 1)):
            yield (path, rg)


class ReadParquetCaptions(_CaptionReaderBase):
    """(path, row_group) -> Caption. Reads only the columns it needs."""

    def __init__(self, fmt: str, columns: CaptionColumns, max_caption_chars: int):
        super().__init__(columns.defaults(fmt), max_caption_chars)
        self.fmt = fmt

    def process(self, element):
        path, rg = element
        c = self.columns
        try:
            with open_read(path) as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                text_col = first_present(names, [c.text])
                if text_col is None:
                    n = pf.metadata.row_group(rg).num_rows if pf.metadata.num_row_groups else 0
                    self.rows.inc(n)
                    yield self._reject(
                        "missing_column",
                        f"caption column {c.text!r} not in {names}; set --text_col",
                        path,
                        count=n,
                    )
                    return
                url_col = first_present(names, [c.url])
                key_col = first_present(names, [c.key])
                width_col = first_present(names, ["WIDTH", "width"])
                height_col = first_present(names, ["HEIGHT", "height"])
                status_col = first_present(names, ["status"]) if self.fmt == "parquet" else None
                keep = [k for k in c.keep if k in names]
                cols = [
                    x
                    for x in dict.fromkeys(
                        [text_col, url_col, key_col, width_col, height_col, status_col, *keep]
                    )
                    if x
                ]
                if pf.metadata.num_row_groups == 0:
                    return
                table = pf.read_row_group(rg, columns=cols)
        except Exception as e:  # noqa: BLE001
            _counter("captions_files_unreadable").inc()
            yield self._reject(
                "unreadable_file", f"row group {rg}: {type(e).__name__}: {e}", path, count=0
            )
            return
        source = f"{path}#rg{rg}"
        for i, row in enumerate(table.to_pylist()):
            key = row.get(key_col) if key_col else None
            if key is None and not url_col:
                key = f"{os.path.basename(path)}:{rg}:{i}"
            if status_col and row.get(status_col) not in (None, "success"):
                self.rows.inc()
                yield self._reject(
                    "download_failed", f"status={row.get(status_col)!r}", source, key=key, record=row
                )
                continue
            meta = {k: _jsonable(row.get(k)) for k in keep}
            yield self._caption(
                key=key,
                url=row.get(url_col) if url_col else None,
                text=row.get(text_col),
                source=source,
                width=row.get(width_col) if width_col else None,
                height=row.get(height_col) if height_col else None,
                meta=meta,
                record=row,
            )


def iter_webdataset(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a webdataset tar, in archive order.

    Files of one sample are adjacent in a webdataset tar; a sample ends when the key
    changes. The key is the member's basename up to the first dot.
    """
    current_key = None
    parts: dict[str, bytes] = {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            base = os.path.basename(name)
            if base.startswith("."):
                continue
            dirname = os.path.dirname(name)
            stem, _, ext = base.partition(".")
            key = f"{dirname}/{stem}" if dirname else stem
            if key != current_key and current_key is not None:
                yield current_key, parts
                parts = {}
            current_key = key
            f = tar.extractfile(member)
            parts[ext.lower()] = f.read() if f is not None else b""
    if current_key is not None:
        yield current_key, parts


def _image_part(parts: dict[str, bytes]) -> Optional[bytes]:
    for ext in IMAGE_EXTENSIONS:
        if ext in parts:
            return parts[ext]
    return None


class ReadWebDatasetCaptions(_CaptionReaderBase):
    """tar path -> Caption per sample (KEY.txt caption, KEY.json metadata)."""

    def __init__(self, columns: CaptionColumns, max_caption_chars: int):
        super().__init__(columns.defaults("webdataset"), max_caption_chars)

    def process(self, path):
        n = 0
        try:
            with open_read(path) as f:
                for key, parts in iter_webdataset(f):
                    n += 1
                    yield from self._sample(path, key, parts)
        except Exception as e:  # noqa: BLE001 - truncated / corrupt archive
            _counter("captions_files_broken").inc()
            yield self._reject(
                "broken_archive",
                f"after {n} samples: {type(e).__name__}: {e}",
                path,
                count=0,
            )

    def _sample(self, path, key, parts):
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    meta = {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                meta = {}
        base_key = key.rsplit("/", 1)[-1]
        key = str(meta.get(self.columns.key) or base_key)
        if "txt" in parts:
            text = parts["txt"]
        else:
            text = meta.get(self.columns.text)
        if text is None and _image_part(parts) is None and not meta:
            self.rows.inc()
            yield self._reject("missing_column", f"no .txt/.json/image in sample {key}", path, key)
            return
        keep = {k: _jsonable(meta.get(k)) for k in self.columns.keep if k in meta}
        yield self._caption(
            key=key,
            url=meta.get(self.columns.url),
            text=text,
            source=path,
            width=meta.get("width"),
            height=meta.get("height"),
            meta=keep,
            record={"key": key, "parts": sorted(parts), **meta},
        )


class ReadImages(beam.DoFn):
    """Image bytes keyed by image key, for joining images back after selection.

    webdataset: tar path -> (key, bytes); parquet: (path, row_group) -> (key, bytes).
    Only the key and image columns are read. Read errors were already reported by the
    caption pass over the same files, so they are only counted here.
    """

    def __init__(self, fmt: str, columns: CaptionColumns):
        self.fmt = fmt
        self.columns = columns.defaults(fmt)

    def process(self, element):
        try:
            if self.fmt == "webdataset":
                with open_read(element) as f:
                    for key, parts in iter_webdataset(f):
                        meta = {}
                        if "json" in parts:
                            try:
                                meta = json.loads(parts["json"].decode("utf-8"))
                            except (UnicodeDecodeError, json.JSONDecodeError):
                                meta = {}
                        k = (meta.get(self.columns.key) if isinstance(meta, dict) else None) or (
                            key.rsplit("/", 1)[-1]
                        )
                        img = _image_part(parts)
                        if img is not None:
                            yield str(k), img
            else:
                path, rg = element
                with open_read(path) as f:
                    pf = pq.ParquetFile(f)
                    names = pf.schema_arrow.names
                    key_col = first_present(names, [self.columns.key])
                    url_col = first_present(names, [self.columns.url])
                    img_col = first_present(names, [self.columns.image])
                    if img_col is None:
                        return
                    cols = [x for x in (key_col, url_col, img_col) if x]
                    table = pf.read_row_group(rg, columns=cols)
                for i, row in enumerate(table.to_pylist()):
                    key = row.get(key_col) if key_col else None
                    if key is None and url_col and row.get(url_col):
                        key = url_key(str(row[url_col]))
                    if key is None and not url_col:
                        key = f"{os.path.basename(path)}:{rg}:{i}"
                    if key is not None and row.get(img_col) is not None:
                        yield str(key), row[img_col]
        except Exception as e:  # noqa: BLE001
            _counter("images_read_errors").inc()
            log.warning("image pass over %s stopped: %s", element, e)
