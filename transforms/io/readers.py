"""Readers for the formats users already have, robust to bad input.

* Entity catalogs: OVEN Wiki6M JSON lines (plain or gzip) and Parquet.
* Caption corpora: LAION-style metadata Parquet (URL + caption), img2dataset webdataset
  shards (KEY.jpg / KEY.txt / KEY.json in .tar), Parquet with an image-bytes column
  (img2dataset's parquet output), and caption lists as CSV, TSV or JSON lines (CC3M,
  CC12M, WIT), plain or gzip.

Every reader is a DoFn over file paths (local, globs, gs://, anything Beam's FileSystems
opens). A row that cannot be used becomes a `Reject` on the `rejected` output with its
reason; a file that cannot be read becomes one `Reject` for the whole file. Nothing raises.
Parquet files are split by row group so that big LAION files are read in parallel.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Optional

import apache_beam as beam
import pyarrow.parquet as pq

from transforms.formats import safe_json
from transforms.formats.files import maybe_gunzip, open_read
from transforms.formats.keys import (
    REF_SEP,
    expand_patterns,
    image_identity,
    is_hidden_file,
    row_group_source,
    source_tag,
)
from transforms.formats.parquet import first_present, is_parquet, row_group_units
from transforms.formats.shards import read_images_at  # noqa: F401 - the image pass of select_candidates
from transforms.formats.text import strip_controls
from transforms.formats.webdataset import (
    DEFAULT_LIMITS,
    Refused,
    TarLimits,
    TarMemberRef,
    damage_reason,
    is_tar,
    read_samples,
    webdataset_corpus_key,
)
from transforms.io.retry import read_guarded, retry_stream
from transforms.run.progress import counter
from transforms.schema import Caption, Entity, Reject, truncate_json

log = logging.getLogger(__name__)

REJECTED = "rejected"
CAPTION_FORMATS = ("laion_parquet", "webdataset", "parquet", "csv", "tsv", "jsonl")



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
    raw_title = title
    title = strip_controls(title).strip()
    if not qid:
        return ("missing_field", "empty wikidata_id")
    if not title:
        return ("empty_title", "empty wikipedia_title")
    summary = obj.get("wikipedia_summary")
    if summary is not None and not isinstance(summary, str):
        summary = str(summary)
    if summary is not None:
        summary = strip_controls(summary)
    extra = {
        k: v
        for k, v in obj.items()
        if k not in ("wikidata_id", "wikipedia_title", "wikipedia_summary")
    }
    if strip_controls(raw_title) is not raw_title:
        extra["title_raw"] = raw_title  # control / bidi characters were removed from the title
    return Entity(
        qid=qid,
        title=title,
        summary=summary,
        file_index=file_index,
        row=row,
        extra_json=json.dumps(extra, ensure_ascii=False, default=str) if extra else None,
    )


# A catalog line longer than this is a reject, read past in chunks, never held whole: a
# Wiki6M line (title, summary, a few fields) is a few kB.
MAX_CATALOG_LINE_BYTES = 1 << 20


def _lines(stream, max_bytes: int):
    """The lines of a binary stream; a line longer than `max_bytes` comes as its length
    (an int) instead, after its bytes were read past in chunks of at most `max_bytes`."""
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes:
            yield line
            continue
        n = len(line)
        while not line.endswith(b"\n"):
            line = stream.readline(max_bytes + 1)
            if not line:
                break
            n += len(line)
        yield n


class ReadCatalogFile(beam.DoFn):
    """(file_index, path) -> Entity, with Reject on the `rejected` tag.

    Reads one file sequentially, so row numbers (and the int ids derived from them) follow
    file order.
    """

    STAGE = "read_catalog"

    def __init__(self, max_line_bytes: int = MAX_CATALOG_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self.rows = counter("catalog_rows_read")
        self.ok = counter("catalog_rows_ok")

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

        def unreadable(e):
            # A broken file is a reject, not a crash; an I/O error is raised (retried).
            log.warning("catalog file %s unreadable: %s", path, e)
            counter("catalog_files_unreadable").inc()
            yield self._reject("unreadable_file", f"{type(e).__name__}: {e}", path, count=0)

        reader = self._parquet if is_parquet(path) else self._jsonl
        yield from read_guarded(lambda: reader(file_index, path), path, unreadable)

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
            for row, line in enumerate(_lines(io.BufferedReader(stream, 1 << 20), self.max_line_bytes)):
                if isinstance(line, int):
                    self.rows.inc()
                    yield self._reject("line_too_long", f"{line:,} bytes > --max_line_bytes {self.max_line_bytes:,}; not parsed", path, row=row)
                    continue
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.rows.inc()
                    yield self._reject("bad_utf8", str(e), path, row=row, record=repr(line[:200]))
                    continue
                try:
                    obj = safe_json.loads(text)
                except safe_json.JSONError as e:
                    self.rows.inc()
                    yield self._reject(e.reason, e.detail, path, row=row, record=text[:500])
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


# A raw caption longer than this many times --max_caption_chars is refused before it is
# decoded or normalised (whitespace runs may shrink a caption, but not by this much).
RAW_CAPTION_FACTOR = 4


def raw_caption_limit(max_chars: int) -> int:
    return RAW_CAPTION_FACTOR * max_chars + 64


def _clean_caption(value, max_chars: int):
    """(caption, None) or (None, (reason, detail)). The length is checked on the raw value
    first (a 255 MiB caption is never split and joined), then on the normalised text:
    whitespace runs collapsed, control and bidi-override characters removed
    (`formats.text.strip_controls`)."""
    if value is None:
        return None, ("empty_caption", "caption is null")
    if isinstance(value, (str, bytes, bytearray, memoryview)) and len(value) > raw_caption_limit(max_chars):
        return None, ("caption_too_long", f"{len(value):,} raw chars/bytes > {RAW_CAPTION_FACTOR} x --max_caption_chars {max_chars}")
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
    text = " ".join(strip_controls(value).split())
    if not text:
        return None, ("empty_caption", "caption is empty or whitespace")
    if len(text) > max_chars:
        return None, ("caption_too_long", f"{len(text)} chars > --max_caption_chars {max_chars}")
    return text, None


# A URL, key or kept column's value longer than this is refused (`value_too_long`).
MAX_VALUE_BYTES = 64 * 1024


def _drop_oversized(table, limits: dict, default_limit: int):
    """(table, {row: (column, bytes)}): string and binary values over their column's limit
    are measured in Arrow and nulled there, so they never become Python strings; the rows
    they were in are rejects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    oversized: dict[int, tuple[str, int]] = {}
    for name in table.column_names:
        column = table[name]
        t = column.type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            continue
        limit = limits.get(name, default_limit)
        lengths = pc.binary_length(column)
        over = pc.fill_null(pc.greater(lengths, limit), False)
        if not pc.any(over).as_py():
            continue
        for i in pc.indices_nonzero(over).to_pylist():
            oversized.setdefault(i, (name, int(lengths[i].as_py())))
        table = table.set_column(table.column_names.index(name), name, pc.if_else(over, pa.scalar(None, t), column))
    return table, oversized


def _int_or_none(v) -> Optional[int]:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        return None
    return v


# --------------------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------------------

class ListFiles(beam.PTransform):
    """A comma list of paths, folders and globs -> the distinct file paths they match.

    Matching runs inside the pipeline (Beam's MatchAll), so a corpus of 200,000 files is
    not pickled into the job graph as a list; hidden and `_`-prefixed files are skipped.
    The launcher still checks that each pattern matches something (`match_files`).
    """

    def __init__(self, pattern: str, suffixes: Optional[tuple[str, ...]] = None):
        super().__init__()
        self.globs = expand_patterns(pattern)
        self.suffixes = suffixes

    def expand(self, pbegin):
        from apache_beam.io import fileio

        from transforms.run.shuffles import MeasureShuffle

        suffixes = self.suffixes

        def wanted(path: str) -> bool:
            if is_hidden_file(path) or path.endswith("/"):
                return False
            return suffixes is None or path.lower().endswith(suffixes)

        return (
            pbegin
            | "Patterns" >> beam.Create(self.globs)
            | "Match" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
            | "Paths" >> beam.Map(lambda m: m.path)
            | "Wanted" >> beam.Filter(wanted)
            | "MeasureDistinct" >> MeasureShuffle("list_files")
            | "Distinct" >> beam.Distinct()
        )


# --------------------------------------------------------------------------------------
# Caption readers
# --------------------------------------------------------------------------------------

class _CaptionReaderBase(beam.DoFn):
    STAGE = "read_captions"

    def __init__(self, columns: CaptionColumns, max_caption_chars: int, root: Optional[str]):
        self.columns = columns
        self.max_caption_chars = max_caption_chars
        # None: keys are not qualified by their file (caption-only corpora without keys).
        self.root = root
        self.rows = counter("captions_rows_read")
        self.ok = counter("captions_rows_ok")

    def _reject(self, reason, detail, source, key=None, record=None, count=1):
        return beam.pvalue.TaggedOutput(REJECTED, Reject.of(self.STAGE, reason, detail, key, source, record, count))

    def _tag(self, path: str) -> Optional[str]:
        return None if self.root is None else source_tag(path, self.root)

    def _caption(self, *, key, url, text, source, width=None, height=None, meta=None, record, image_ref=None):
        """`key` is the final image identity or None (then no identity could be made)."""
        self.rows.inc()
        caption, err = _clean_caption(text, self.max_caption_chars)
        if err:
            return self._reject(err[0], err[1], source, key=key, record=record)
        if isinstance(text, str) and strip_controls(text) is not text:
            # Control / bidi characters were removed: the raw caption stays in meta_json.
            meta = {**(meta or {}), "caption_raw": text}
        if url is not None and not isinstance(url, str):
            url = str(url)
        if not key:
            return self._reject("missing_key", "row has neither a key nor a URL", source, record=record)
        self.ok.inc()
        return Caption(
            key=str(key),
            url=url,
            caption=caption,
            source=source,
            width=_int_or_none(width),
            height=_int_or_none(height),
            meta_json=json.dumps(meta, ensure_ascii=False, default=str) if meta else None,
            image_ref=image_ref,
        )


class SplitParquet(beam.DoFn):
    """path -> (path, row_group) work items, so one big file is read by many workers."""

    def process(self, element):
        # A path, or (path, companion) from ShardUnits' pairing: companions' units say so.
        path, companion = element if isinstance(element, tuple) else (element, False)

        def units():
            with open_read(path) as f:
                for unit in row_group_units(path, f):
                    yield (*unit, True) if companion else unit

        def unreadable(e):
            counter("captions_files_unreadable").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                Reject(stage="read_captions", reason="unreadable_file", detail=f"{type(e).__name__}: {e}", source=path, count=0),
            )

        yield from read_guarded(units, path, unreadable)


class ReadParquetCaptions(_CaptionReaderBase):
    """(path, row_group) -> Caption. Reads only the columns it needs (never the images:
    for image corpora a caption carries its row's location, `p:<rg>:<row>`)."""

    def __init__(self, fmt: str, columns: CaptionColumns, max_caption_chars: int, root: Optional[str] = None):
        super().__init__(columns.defaults(fmt), max_caption_chars, root)
        self.fmt = fmt

    def process(self, element):
        path, rg = element

        def unreadable(e):
            counter("captions_files_unreadable").inc()
            yield self._reject("unreadable_file", f"row group {rg}: {type(e).__name__}: {e}", path, count=0)

        yield from read_guarded(lambda: self._read(path, rg), row_group_source(path, rg), unreadable)

    def _read(self, path, rg):
        c = self.columns
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
        table, oversized = _drop_oversized(table, {text_col: raw_caption_limit(self.max_caption_chars)}, MAX_VALUE_BYTES)
        source = row_group_source(path, rg)
        tag = self._tag(path)
        images = self.fmt == "parquet"
        for i, row in enumerate(table.to_pylist()):
            if i in oversized:
                self.rows.inc()
                column, size = oversized[i]
                reason = "caption_too_long" if column == text_col else "value_too_long"
                yield self._reject(reason, f"column {column!r}: {size:,} bytes, refused before decoding", source, record=row)
                continue
            corpus_key = row.get(key_col) if key_col else None
            url = row.get(url_col) if url_col else None
            if (corpus_key is None or corpus_key == "") and not url_col:
                corpus_key = f"{rg}:{i}"  # a row position is an identity within its file
            key = image_identity(corpus_key, url, tag, qualify_url=images)
            if status_col and row.get(status_col) not in (None, "success"):
                self.rows.inc()
                yield self._reject(
                    "download_failed", f"status={row.get(status_col)!r}", source, key=key, record=row
                )
                continue
            meta = {k: _jsonable(row.get(k)) for k in keep}
            yield self._caption(
                key=key,
                url=url,
                text=row.get(text_col),
                source=source,
                width=row.get(width_col) if width_col else None,
                height=row.get(height_col) if height_col else None,
                meta=meta,
                record=row,
                image_ref=f"p:{rg}:{i}" if images else None,
            )


class ReadWebDatasetCaptions(_CaptionReaderBase):
    """tar path -> Caption per sample (KEY.txt caption, KEY.json metadata).

    Image members are not read: each caption carries its image's location in the tar
    (`t:<offset>:<size>`), and the selected ones are read back by offset after selection.
    A key that occurs more than once in a tar gets the locations of all its images, so
    the image pass can tell one image with several captions from two images sharing a key.
    """

    def __init__(self, columns: CaptionColumns, max_caption_chars: int, root: str = "", limits: TarLimits = DEFAULT_LIMITS):
        super().__init__(columns.defaults("webdataset"), max_caption_chars, root)
        self.limits = limits

    def process(self, path):
        # A damaged tar still yields the samples before the damage, then one reject; an
        # I/O error is retried, then raised.
        def read():
            with open_read(path) as f:
                yield read_samples(f, path=path, locate_images=True, limits=self.limits)

        (samples, damage), = retry_stream(read, path)
        if damage is not None:
            counter("captions_files_broken").inc()
            yield self._reject(
                damage_reason(damage),
                f"after {len(samples)} samples: {type(damage).__name__}: {damage}",
                path,
                count=0,
            )
        tag = self._tag(path)
        prepared = []
        locations: dict[str, list[str]] = {}
        for s in samples:
            key = image_identity(webdataset_corpus_key(s.key, s.meta, self.columns.key), None, tag)
            if isinstance(s.image, TarMemberRef):
                locations.setdefault(key, []).append(s.image.locator())
            prepared.append((key, s))
        for key, s in prepared:
            if s.refused is not None or s.bad_json:
                # A sample whose KEY.json is not usable JSON (nested 100,000 deep, not an
                # object) is a reject, not a caption without its metadata.
                self.rows.inc()
                reason, detail = s.refused or ("bad_json", s.bad_json)
                yield self._reject(reason, detail, path, key, {"key": key, "parts": sorted(s.parts)})
                continue
            yield from self._sample(path, key, s.parts, s.meta, s.image, REF_SEP.join(locations.get(key, ())) or None)

    def _sample(self, path, key, parts, meta, image, refs):
        text = meta.get(self.columns.text) if "txt" not in parts else parts["txt"]
        if isinstance(text, (TarMemberRef, Refused)):  # over the text member budget: never read
            self.rows.inc()
            yield self._reject("caption_too_long", f"KEY.txt of {text.size:,} bytes", path, key)
            return
        if text is None and image is None and not meta:
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
            image_ref=refs,
        )


# --------------------------------------------------------------------------------------
# Shard inputs of decontaminate and refine
# --------------------------------------------------------------------------------------


def is_img2dataset_stats(path: str) -> bool:
    """img2dataset's `<shard>_stats.json` beside each shard: a report, not data."""
    return path.endswith("_stats.json")


def _file_stem(path: str) -> tuple[str, str]:
    folder, _, name = path.rstrip("/").rpartition("/")
    return folder, name.split(".", 1)[0]


def _mark_companions(element):
    """(folder, stem), paths -> (path, companion): a Parquet file beside a tar of the same
    stem is img2dataset's metadata of that tar (its rows: every URL tried, with `status`)."""
    _, paths = element
    paths = list(paths)
    has_tar = any(is_tar(p) for p in paths)
    for p in paths:
        yield p, has_tar and not is_tar(p)


class ShardUnits(beam.PTransform):
    """Shards (Parquet and/or webdataset tars, matched in the job) -> read units: (path,
    row group) for Parquet, the path for a tar; plus rejects for unreadable Parquet files.
    `has_parquet` / `has_tars` (from the launcher's listing) leave out branches with no
    input, so the graph stays what the inputs need.

    `pair_companions`: an img2dataset webdataset folder holds `00000.tar` (the images) and
    `00000.parquet` (every URL of that shard tried, with `status`); such a Parquet file's
    units are (path, row group, True): its reader takes only the failed downloads from it,
    as rejects (the successes are the tar's samples). Files are paired by folder and stem in
    the job (a shuffle of file paths only)."""

    def __init__(self, pattern: str, has_parquet: bool, has_tars: bool, pair_companions: bool = False):
        super().__init__()
        self.pattern = pattern
        self.has_parquet = has_parquet
        self.has_tars = has_tars
        self.pair_companions = pair_companions

    def expand(self, pbegin):
        from transforms.run.shuffles import MeasureShuffle

        files = pbegin | "InputFiles" >> ListFiles(self.pattern)
        units, rejects = [], []
        if self.has_parquet:
            parquet = files | "ParquetOnly" >> beam.Filter(lambda f: not is_tar(f) and not is_img2dataset_stats(f))
            if self.pair_companions and self.has_tars:
                parquet = (
                    files
                    | "ByStem" >> beam.Map(lambda f: (_file_stem(f), f))
                    | "MeasureStems" >> MeasureShuffle("pair_shard_files")
                    | "GroupStems" >> beam.GroupByKey()
                    | "MarkCompanions" >> beam.FlatMap(_mark_companions)
                    | "ParquetMarked" >> beam.Filter(lambda pc: not is_tar(pc[0]) and not is_img2dataset_stats(pc[0]))
                )
            split = parquet | "SplitRowGroups" >> beam.ParDo(SplitParquet()).with_outputs(REJECTED, main="units")
            units.append(split.units)
            rejects.append(split[REJECTED])
        if self.has_tars:
            units.append(files | "TarsOnly" >> beam.Filter(is_tar))
        all_units = tuple(units) | "AllUnits" >> beam.Flatten()
        all_rejects = tuple(rejects) | "UnitRejects" >> beam.Flatten() if rejects else pbegin | "NoRejects" >> beam.Create([])
        return all_units, all_rejects


# A caption list's line holds a caption, a URL and a few more columns: a line longer than
# this is refused (`line_too_long`) before it is decoded or split.
def max_line_bytes(max_caption_chars: int) -> int:
    return raw_caption_limit(max_caption_chars) + 4 * MAX_VALUE_BYTES


TEXT_LIST_FORMATS = ("csv", "tsv", "jsonl")
# Column names of a headerless CSV / TSV by default: CC3M's and CC12M's order.
HEADERLESS_COLUMNS = ("caption", "url")


class ReadTextListCaptions(_CaptionReaderBase):
    """path -> Caption per line of a caption list: CSV, TSV (CC3M / CC12M / WIT style) or
    JSON lines, plain or gzip. A file is read by one worker, line by line: each raw line is
    bounded (`max_line_bytes`) and decoded on its own, so a bad line is one reject (`bad_utf8`,
    `line_too_long`, `bad_row`, `not_an_object`) and the next line is read. CSV and TSV take
    their column names from the first row (`header`) or from `names`; TSV fields are not
    quoted (a caption may hold a `"`), CSV's are. Keys as for LAION Parquet: the key column,
    else a hash of the URL, else the line number in its file."""

    def __init__(self, fmt: str, columns: CaptionColumns, max_caption_chars: int, root: Optional[str] = None,
                 header: bool = True, names: tuple[str, ...] = HEADERLESS_COLUMNS):
        super().__init__(columns.defaults(fmt), max_caption_chars, root)
        self.fmt = fmt
        self.header = header
        self.names = tuple(names)

    def process(self, path):
        def unreadable(e):
            counter("captions_files_unreadable").inc()
            yield self._reject("unreadable_file", f"{type(e).__name__}: {e}", path, count=0)

        yield from read_guarded(lambda: self._read(path), path, unreadable)

    def _lines(self, f, rejects: list):
        """(line number, text) of each line that decodes; a bad one goes to `rejects`."""
        limit = max_line_bytes(self.max_caption_chars)
        n = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            n += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # the rest of the line, a chunk at a time
                    raw = f.readline(limit + 1)
                    size += len(raw)
                self.rows.inc()
                rejects.append(self._reject("line_too_long", f"line {n}: {size:,} bytes > {limit:,}", f"{self._path}:{n}"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self.rows.inc()
                rejects.append(self._reject("bad_utf8", f"line {n}: {e}", f"{self._path}:{n}"))
                continue
            if n == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a byte order mark
            if not text.strip():
                continue  # blank lines are no rows
            yield n, text

    def _read(self, path):
        import csv

        self._path = path
        tag = self._tag(path)
        c = self.columns
        rejects: list = []
        with open_read(path) as f:
            numbered = self._lines(f, rejects)
            if self.fmt == "jsonl":
                rows = self._json_rows(numbered, rejects)
            else:
                numbers: list[int] = []

                def texts():
                    for n, text in numbered:
                        numbers.append(n)
                        yield text

                dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if self.fmt == "tsv" else {"delimiter": ","}
                reader = csv.reader(texts(), strict=True, **dialect)
                rows = self._csv_rows(reader, numbers, rejects)
            first = True
            for n, row in rows:
                yield from rejects
                rejects.clear()
                if first and self.fmt != "jsonl" and c.text not in self._names:
                    yield from self._missing_column(row, rows, rejects)
                    return
                first = False
                if row.get("_bad"):
                    self.rows.inc()
                    yield self._reject(row["_bad"][0], f"line {n}: {row['_bad'][1]}", f"{path}:{n}", record=row.get("_raw"))
                    continue
                corpus_key = row.get(c.key) if c.key else None
                url = row.get(c.url) if c.url else None
                if (corpus_key is None or corpus_key == "") and (url is None or url == ""):
                    corpus_key = f"line{n}"
                key = image_identity(corpus_key, url, tag, qualify_url=False)
                yield self._caption(
                    key=key, url=url or None, text=row.get(c.text), source=f"{path}:{n}",
                    width=row.get("WIDTH", row.get("width")), height=row.get("HEIGHT", row.get("height")),
                    meta={k: _jsonable(row.get(k)) for k in c.keep if k in row}, record=row,
                )
            yield from rejects

    def _missing_column(self, row, rows, rejects):
        """The caption column is not in the file: every row of it is one reject (lines that
        did not decode are their own rejects, already counted)."""
        count = 1 + sum(1 for _ in rows)
        self.rows.inc(count)
        how = "set --text_col" + ("" if self.header is False else " (or --csv_header no --csv_columns for a file without a header row)")
        yield self._reject("missing_column", f"caption column {self.columns.text!r} not in {sorted(self._names)}; {how}",
                           self._path, count=count)
        yield from rejects
        rejects.clear()

    def _csv_rows(self, reader, numbers, rejects):
        import csv

        names = None if self.header else list(self.names)
        self._names = set(names or ())
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                n = numbers[-1] if numbers else 0
                self.rows.inc()
                rejects.append(self._reject("bad_row", f"line {n}: {e}", f"{self._path}:{n}"))
                continue
            n = numbers[-1] if numbers else 0
            if names is None:
                names = [strip_controls(x).strip() for x in fields]
                self._names = set(names)
                continue
            row = {name: (fields[i] if i < len(fields) else None) for i, name in enumerate(names)}
            if len(fields) > len(names):
                row["_extra_fields"] = len(fields) - len(names)
            yield n, row

    def _json_rows(self, numbered, rejects):
        limit = max_line_bytes(self.max_caption_chars)
        for n, text in numbered:
            try:
                obj = safe_json.loads(text, max_bytes=limit)
            except (ValueError, RecursionError) as e:
                yield n, {"_bad": ("bad_json", f"{type(e).__name__}: {str(e)[:200]}"), "_raw": text[:500]}
                continue
            if not isinstance(obj, dict):
                yield n, {"_bad": ("not_an_object", f"a JSON {type(obj).__name__}, not an object"), "_raw": text[:500]}
                continue
            yield n, {k: (v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)[:1000])
                      for k, v in obj.items()}
