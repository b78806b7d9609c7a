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


# --------------------------------------------------------------------------------------
# Input files and image identity
# --------------------------------------------------------------------------------------

_GLOB_CHARS = "*?["
# Compressed tars (.tar.gz) are read by streaming; their images are located in the
# decompressed stream and read back through the same decompression.
TAR_SUFFIXES = (".tar", ".tar.gz")
_SOURCE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet", ".pq")


def split_patterns(pattern: str) -> list[str]:
    return [p for p in pattern.split(",") if p]


def _literal_dir(pattern: str) -> str:
    """The folder part of a pattern before its first glob character ('' for none)."""
    cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=-1)
    head = pattern if cut < 0 else pattern[:cut]
    if cut < 0 and (head.endswith("/") or ("://" not in head and os.path.isdir(head))):
        return head.rstrip("/") + "/"
    return head[: head.rfind("/") + 1] if "/" in head else ""


def input_root(pattern: str) -> str:
    """The deepest folder above every file the comma-separated `pattern` can match.

    Image identities are qualified by a file's path below this folder, so two
    img2dataset runs (both numbering their keys from 000000000) in run1/ and run2/ give
    run1/00000/000000000 and run2/00000/000000000, not one key twice.
    """
    dirs = [_literal_dir(p) for p in split_patterns(pattern)]
    if not dirs:
        return ""
    parts = [d.rstrip("/").split("/") for d in dirs]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    root = "/".join(common)
    if root:
        return root + "/"
    # Absolute paths with nothing in common but "/" keep the whole path as their tag.
    return "/" if all(d.startswith("/") for d in dirs) else ""


def source_tag(path: str, root: str) -> str:
    """A file's path below `root` without its format suffix: `run1/00000` for
    `<root>run1/00000.tar`."""
    rel = path[len(root) :] if path.startswith(root) else path
    rel = rel.lstrip("/")
    lower = rel.lower()
    for suffix in _SOURCE_SUFFIXES:
        if lower.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def image_identity(corpus_key, url, tag: Optional[str], qualify_url: bool = True) -> Optional[str]:
    """The one rule for an image's key, in every pass over a corpus.

    A corpus key (img2dataset's `key`, a key column) is only unique within its file, so it
    is qualified by the file's tag: `<tag>/<key>`. Without a key, the URL names the image:
    a hash of it, qualified by the tag too for image corpora (`qualify_url`), where two
    files may hold different downloads of one URL; in a caption-only corpus the URL alone
    is the identity (img2dataset downloads it once). None when the row has neither.
    An empty string is no key.
    """
    if corpus_key is not None and str(corpus_key) != "":
        return f"{tag}/{corpus_key}" if tag else str(corpus_key)
    if url is not None and str(url) != "":
        h = url_key(str(url))
        return f"{tag}/{h}" if tag and qualify_url else h
    return None


def is_hidden_file(path: str) -> bool:
    """img2dataset's `_stats.json`, editors' dot files: never corpus data."""
    return os.path.basename(path.rstrip("/")).startswith((".", "_"))


def expand_patterns(pattern: str) -> list[str]:
    """Globs to match for a comma list of paths, folders and globs (a folder: its files)."""
    from apache_beam.io.filesystems import FileSystems

    out = []
    for p in split_patterns(pattern):
        if not any(ch in p for ch in _GLOB_CHARS) and FileSystems.exists(p):
            is_dir = p.endswith("/") if "://" in p else os.path.isdir(p)
            if is_dir:
                p = p.rstrip("/") + "/*"
        out.append(p)
    return out


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

        from transforms.accounting import MeasureShuffle

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
# Webdataset tars
# --------------------------------------------------------------------------------------

TAR_BLOCK = 512


@dataclass(frozen=True)
class TarMemberRef:
    """Where a member's bytes lie in an uncompressed tar: read them back with one ranged
    read, and check the member header just before them."""

    data_offset: int
    size: int

    def locator(self) -> str:
        return f"t:{self.data_offset}:{self.size}"


def _tar_mode(path: Optional[str], fileobj) -> str:
    """Random access ('r:', members skipped by seeking) for plain tars; streaming for the rest."""
    plain = path is None or path.lower().endswith(".tar")
    # io objects have seekable(); Beam's CompressedFile has a `seekable` property.
    attr = getattr(fileobj, "seekable", None)
    seekable = attr() if callable(attr) else bool(attr)
    return "r:" if plain and seekable else "r|*"


def iter_webdataset(fileobj, *, path: Optional[str] = None, read_ext=None) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes | TarMemberRef}) per sample of a webdataset tar, in order.

    Files of one sample are adjacent in a webdataset tar; a sample ends when the key
    changes. The key is the member's basename up to the first dot (with its folder, if
    any). `read_ext(ext) -> bool` says which members to read; the others are given as
    `TarMemberRef`s (their bytes are skipped, by seeking when the tar is plain and
    seekable). By default every member is read.
    """
    current_key = None
    parts: dict = {}
    mode = _tar_mode(path, fileobj)
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
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
            ext = ext.lower()
            if read_ext is None or read_ext(ext):
                f = tar.extractfile(member)
                parts[ext] = f.read() if f is not None else b""
            else:
                parts[ext] = TarMemberRef(member.offset_data, member.size)
    if current_key is not None:
        yield current_key, parts


def image_part(parts: dict):
    """The sample's image member (bytes or a TarMemberRef), by extension preference."""
    for ext in IMAGE_EXTENSIONS:
        if ext in parts:
            return parts[ext]
    return None


_image_part = image_part  # older name, still used by the decontamination reader


def read_tar_member(fileobj, ref: TarMemberRef) -> bytes:
    """A member's bytes by its offset, after checking that the header block in front of
    them is a valid tar header of that size (so a tar rewritten since it was indexed is an
    error, not wrong bytes)."""
    fileobj.seek(ref.data_offset - TAR_BLOCK)
    block = fileobj.read(TAR_BLOCK + ref.size)
    if len(block) < TAR_BLOCK + ref.size:
        raise tarfile.ReadError(f"tar ends before the member at offset {ref.data_offset}")
    info = tarfile.TarInfo.frombuf(block[:TAR_BLOCK], tarfile.ENCODING, "surrogateescape")
    if info.size != ref.size:
        raise tarfile.ReadError(
            f"member header at offset {ref.data_offset - TAR_BLOCK} says {info.size} bytes, "
            f"expected {ref.size}: the tar changed since it was read"
        )
    return block[TAR_BLOCK:]


def _sample_meta(parts: dict) -> dict:
    raw = parts.get("json")
    if not isinstance(raw, (bytes, bytearray)):
        return {}
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def webdataset_corpus_key(member_key: str, meta: dict, key_field: str = "key"):
    """A sample's corpus key: its metadata's key field, else the member name's stem."""
    value = meta.get(key_field)
    if value is not None and str(value) != "":
        return str(value)
    return member_key.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------
# Caption readers
# --------------------------------------------------------------------------------------

REF_SEP = ","


def merge_refs(a: Optional[str], b: Optional[str]) -> Optional[str]:
    """The union of two image-location lists, in a stable order."""
    if not a or a == b:
        return a or b
    if not b:
        return a
    return REF_SEP.join(sorted(set(a.split(REF_SEP)) | set(b.split(REF_SEP))))


class _CaptionReaderBase(beam.DoFn):
    STAGE = "read_captions"

    def __init__(self, columns: CaptionColumns, max_caption_chars: int, root: Optional[str]):
        self.columns = columns
        self.max_caption_chars = max_caption_chars
        # None: keys are not qualified by their file (caption-only corpora without keys).
        self.root = root
        self.rows = _counter("captions_rows_read")
        self.ok = _counter("captions_rows_ok")

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


def row_group_source(path: str, rg: int) -> str:
    return f"{path}#rg{rg}"


def source_file(source: str) -> str:
    """The file of a `source` (a path, or `path#rgN` for a Parquet row group)."""
    head, sep, tail = source.rpartition("#rg")
    return head if sep and tail.isdigit() else source


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
    """(path, row_group) -> Caption. Reads only the columns it needs (never the images:
    for image corpora a caption carries its row's location, `p:<rg>:<row>`)."""

    def __init__(self, fmt: str, columns: CaptionColumns, max_caption_chars: int, root: Optional[str] = None):
        super().__init__(columns.defaults(fmt), max_caption_chars, root)
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
        source = row_group_source(path, rg)
        tag = self._tag(path)
        images = self.fmt == "parquet"
        for i, row in enumerate(table.to_pylist()):
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

    def __init__(self, columns: CaptionColumns, max_caption_chars: int, root: str = ""):
        super().__init__(columns.defaults("webdataset"), max_caption_chars, root)

    def process(self, path):
        samples = []
        try:
            with open_read(path) as f:
                for member_key, parts in iter_webdataset(
                    f, path=path, read_ext=lambda ext: ext not in IMAGE_EXTENSIONS
                ):
                    samples.append((member_key, parts))
        except Exception as e:  # noqa: BLE001 - truncated / corrupt archive
            _counter("captions_files_broken").inc()
            yield self._reject(
                "broken_archive",
                f"after {len(samples)} samples: {type(e).__name__}: {e}",
                path,
                count=0,
            )
        # A truncated tar still yields the samples before the damage.
        tag = self._tag(path)
        prepared = []
        locations: dict[str, list[str]] = {}
        for member_key, parts in samples:
            meta = _sample_meta(parts)
            key = image_identity(webdataset_corpus_key(member_key, meta, self.columns.key), None, tag)
            image = image_part(parts)
            if isinstance(image, TarMemberRef):
                locations.setdefault(key, []).append(image.locator())
            prepared.append((key, parts, meta, image))
        for key, parts, meta, image in prepared:
            yield from self._sample(path, key, parts, meta, image, REF_SEP.join(locations.get(key, ())) or None)

    def _sample(self, path, key, parts, meta, image, refs):
        text = parts.get("txt")
        if text is None:
            text = meta.get(self.columns.text)
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
# Image pass: read back only the selected images
# --------------------------------------------------------------------------------------


def read_images_at(path: str, locators: list[str], image_col: Optional[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """({locator: image bytes}, {locator: why there is none}) for locations in one file.

    `t:<offset>:<size>` are ranged reads of a plain tar (its header checked);
    `p:<rg>:<row>` read only the image column of the row groups that hold selected rows.
    A location that holds no image is data (the second dict); I/O errors propagate, so
    the runner retries the bundle.
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
                    images[loc] = read_tar_member(f, TarMemberRef(int(off), int(size)))
                except tarfile.TarError as e:
                    missing[loc] = f"{type(e).__name__}: {e}"
    if pq_refs:
        by_rg: dict[int, list[int]] = {}
        for loc in pq_refs:
            _, rg, row = loc.split(":")
            by_rg.setdefault(int(rg), []).append(int(row))
        with open_read(path) as f:
            pf = pq.ParquetFile(f)
            col = first_present(pf.schema_arrow.names, [image_col])
            for rg, rows in sorted(by_rg.items()):
                if col is None or rg >= pf.metadata.num_row_groups:
                    for row in rows:
                        missing[f"p:{rg}:{row}"] = f"no image column {image_col!r}" if col is None else "no such row group"
                    continue
                column = pf.read_row_group(rg, columns=[col]).column(0)
                for row in rows:
                    value = column[row].as_py() if row < len(column) else None
                    if value is None:
                        missing[f"p:{rg}:{row}"] = "null image" if row < len(column) else "no such row"
                    else:
                        images[f"p:{rg}:{row}"] = bytes(value)
    return images, missing


class ShardUnits(beam.PTransform):
    """Shards (Parquet and/or webdataset tars, matched in the job) -> read units: (path,
    row group) for Parquet, the path for a tar; plus rejects for unreadable Parquet files.
    `has_parquet` / `has_tars` (from the launcher's listing) leave out branches with no
    input, so the graph stays what the inputs need."""

    def __init__(self, pattern: str, has_parquet: bool, has_tars: bool):
        super().__init__()
        self.pattern = pattern
        self.has_parquet = has_parquet
        self.has_tars = has_tars

    def expand(self, pbegin):
        files = pbegin | "InputFiles" >> ListFiles(self.pattern)
        units, rejects = [], []
        if self.has_parquet:
            split = (
                files
                | "ParquetOnly" >> beam.Filter(lambda f: not f.lower().endswith(".tar"))
                | "SplitRowGroups" >> beam.ParDo(SplitParquet()).with_outputs(REJECTED, main="units")
            )
            units.append(split.units)
            rejects.append(split[REJECTED])
        if self.has_tars:
            units.append(files | "TarsOnly" >> beam.Filter(lambda f: f.lower().endswith(".tar")))
        all_units = tuple(units) | "AllUnits" >> beam.Flatten()
        all_rejects = tuple(rejects) | "UnitRejects" >> beam.Flatten() if rejects else pbegin | "NoRejects" >> beam.Create([])
        return all_units, all_rejects
