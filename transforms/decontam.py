"""Decontamination against evaluation images (GER: drop every training image whose CLIP
image embedding has cosine > 0.95 with any OVEN val/test image).

Pieces:
  ReadCandidateImages  select_candidates Parquet (image column) or img2dataset webdataset
                       shards downloaded from its caption-only output -> Candidate
  list_eval_images     a folder, a glob, or OVEN annotation JSON lines + an image root
                       -> [(eval id, path)]
  DecodeImages         bytes -> (record, DecodedImage); bad images -> Reject with the reason
  StackEval            eval vectors -> one EvalMatrix (ids + float32 matrix), a side input
  DropNearDuplicates   batched exact cosine search (one matrix product per batch):
                       kept -> Sample, dropped -> Reject naming the eval image and similarity
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.common import METRICS_NAMESPACE, UsageError, maybe_gunzip, open_read
from transforms.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from transforms.readers import (
    REJECTED,
    _image_part,
    image_identity,
    iter_webdataset,
    source_tag,
    webdataset_corpus_key,
)
from transforms.schema import Candidate, Reject, Sample, from_row, truncate_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif")


def _counter(name: str):
    return Metrics.counter(METRICS_NAMESPACE, name)


_reject = Reject.of


# --------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------


class ReadCandidateImages(beam.DoFn):
    """A Parquet row group (path, rg) or a webdataset tar path -> Candidate with image bytes.

    Parquet: select_candidates output (columns of `Candidate`), or img2dataset's parquet
    output with our columns saved (`jpg` image column, `status`). Webdataset: img2dataset
    shards whose KEY.json carries qid / title / score / rank / entity_id
    (`--save_additional_columns`).

    Keys follow the corpus identity rule (`readers.image_identity`): img2dataset's own keys
    (tars, its parquet output) are qualified by their file below `root`; select_candidates
    output already carries qualified keys and keeps them.
    """

    STAGE = "read_candidates"

    def __init__(self, root: str = ""):
        self.root = root

    def process(self, element):
        try:
            if isinstance(element, tuple):
                yield from self._parquet(*element)
            else:
                yield from self._tar(element)
        except Exception as e:  # noqa: BLE001 - a broken file is a reject, not a crash
            _counter("candidate_files_unreadable").inc()
            source = element[0] if isinstance(element, tuple) else element
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                _reject(self.STAGE, "unreadable_file", f"{type(e).__name__}: {e}"[:500], source=source, count=0),
            )

    def _emit(self, row: dict, source: str):
        _counter("candidates_read").inc()
        image = row.get("image")
        if image is None:
            image = row.get("jpg")
        status = row.get("status")
        key = row.get("key")
        if status not in (None, "success"):
            return beam.pvalue.TaggedOutput(
                REJECTED,
                _reject(self.STAGE, "download_failed", f"status={status!r} {row.get('error_message') or ''}".strip(), key, source, row),
            )
        if not row.get("qid"):
            return beam.pvalue.TaggedOutput(
                REJECTED,
                _reject(
                    self.STAGE,
                    "missing_entity",
                    "no qid: not a select_candidates output (keep qid/title with img2dataset "
                    "--save_additional_columns)",
                    key,
                    source,
                    row,
                ),
            )
        if key is None:
            return beam.pvalue.TaggedOutput(REJECTED, _reject(self.STAGE, "missing_key", "no key", None, source, row))
        cand = from_row(Candidate, {**row, "key": str(key), "image": image, "source": row.get("source") or source})
        if cand.caption is None:
            cand.caption = ""
        return cand

    def _parquet(self, path: str, rg: int):
        with open_read(path) as f:
            pf = pq.ParquetFile(f)
            table = pf.read_row_group(rg)
        img2dataset = "image" not in table.column_names
        tag = source_tag(path, self.root)
        for row in table.to_pylist():
            if img2dataset:
                row["key"] = image_identity(row.get("key"), row.get("url"), tag)
            yield self._emit(row, f"{path}#rg{rg}")

    def _tar(self, path: str):
        n = 0
        try:
            with open_read(path) as f:
                for key, parts in iter_webdataset(f):
                    n += 1
                    meta = {}
                    if "json" in parts:
                        try:
                            meta = json.loads(parts["json"].decode("utf-8"))
                        except (UnicodeDecodeError, json.JSONDecodeError) as e:
                            yield beam.pvalue.TaggedOutput(
                                REJECTED, _reject(self.STAGE, "bad_json", str(e), key, path)
                            )
                            _counter("candidates_read").inc()
                            continue
                    if "txt" in parts and "caption" not in meta:
                        meta["caption"] = parts["txt"].decode("utf-8", "replace")
                    ident = image_identity(webdataset_corpus_key(key, meta), None, source_tag(path, self.root))
                    row = {**meta, "key": ident, "image": _image_part(parts)}
                    yield self._emit(row, path)
        except Exception as e:  # noqa: BLE001
            _counter("candidate_files_broken").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED, _reject(self.STAGE, "broken_archive", f"after {n} samples: {type(e).__name__}: {e}", source=path, count=0)
            )


# --------------------------------------------------------------------------------------
# Evaluation images
# --------------------------------------------------------------------------------------


def _is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _list_images(pattern: str) -> list[str]:
    paths = []
    for p in pattern.split(","):
        if not any(ch in p for ch in "*?[") and os.path.isdir(p):
            # Flat or one level of sub-folders (OVEN's two-digit folders).
            globs = [os.path.join(p, "*"), os.path.join(p, "*", "*")]
        else:
            globs = [p]
        for g in globs:
            try:
                paths += [m.path for m in FileSystems.match([g])[0].metadata_list]
            except Exception:  # noqa: BLE001 - an empty glob level
                continue
    return sorted({x for x in paths if _is_image_path(x)})


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def list_eval_images(eval_images: str, image_root: Optional[str]) -> tuple[list[tuple[str, str]], list[Reject]]:
    """[(eval id, path)] and rejects for annotation lines whose image is missing.

    `eval_images` is a folder or glob of images (id = file stem), or OVEN annotation JSON
    lines (`image_id` per line, `.jsonl` / `.json` / `.gz`) with images found as
    `IMAGE_ID.<ext>` under `image_root`, flat or in sub-folders.
    """
    lower = eval_images.lower()
    if lower.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        if not image_root:
            raise UsageError("--eval_images is an annotation file: give --eval_image_root, the folder of its images")
        if not FileSystems.exists(eval_images):
            raise UsageError(f"--eval_images: no such file {eval_images!r}")
        by_stem = {}
        for path in _list_images(image_root):
            by_stem.setdefault(_stem(path), path)
        if not by_stem:
            raise UsageError(f"--eval_image_root: no image under {image_root!r}")
        ids, rejects, seen = [], [], set()
        with open_read(eval_images) as raw:
            for n, line in enumerate(io.BufferedReader(maybe_gunzip(raw))):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    image_id = str(obj["image_id"])
                except (ValueError, KeyError, TypeError) as e:
                    rejects.append(_reject("eval_images", "bad_annotation", f"line {n}: {e}", source=eval_images))
                    continue
                if image_id in seen:
                    continue  # OVEN asks several questions about one image
                seen.add(image_id)
                path = by_stem.get(image_id)
                if path is None:
                    rejects.append(
                        _reject("eval_images", "eval_image_missing", f"no {image_id}.<ext> under {image_root}", image_id, eval_images)
                    )
                    continue
                ids.append((image_id, path))
        return ids, rejects
    paths = _list_images(eval_images)
    if not paths:
        raise UsageError(f"--eval_images: no image file matches {eval_images!r} (a folder, a glob, or OVEN JSON lines)")
    stems = [_stem(p) for p in paths]
    dup = len(stems) != len(set(stems))
    # A stem shared by two files (a/x.jpg, b/x.jpg) would be ambiguous: use the path.
    return [(p if dup else s, p) for s, p in zip(stems, paths)], []


class ReadEvalImage(beam.DoFn):
    def process(self, element):
        eval_id, path = element
        try:
            with open_read(path) as f:
                yield eval_id, f.read()
        except Exception as e:  # noqa: BLE001
            yield beam.pvalue.TaggedOutput(
                REJECTED, _reject("eval_images", "unreadable_file", f"{type(e).__name__}: {e}", eval_id, path)
            )


# --------------------------------------------------------------------------------------
# Decoding, the eval matrix, the filter
# --------------------------------------------------------------------------------------


class DecodeImages(beam.DoFn):
    """(id, bytes) -> (id, DecodedImage); Candidate -> (Candidate, DecodedImage); a bad image
    is a Reject with the decoder's reason."""

    def __init__(self, stage: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.stage = stage
        self.max_pixels = max_pixels

    def process(self, item):
        if isinstance(item, Candidate):
            key, data, source = item.key, item.image, item.source
        else:
            key, data = item
            source = None
        try:
            decoded = decode_image(data, self.max_pixels)
        except ImageError as e:
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                _reject(
                    self.stage,
                    e.reason,
                    e.detail,
                    key,
                    source,
                    dataclasses.asdict(item) if isinstance(item, Candidate) else {"id": key},
                ),
            )
            return
        _counter(f"{self.stage}_decoded").inc()
        # Eval images continue as their id alone: their bytes are not needed any more.
        yield (item if isinstance(item, Candidate) else key), decoded


class EvalMatrix(NamedTuple):
    ids: list
    vectors: np.ndarray  # float32 [n, dim], L2-normalised


class StackEval(beam.CombineFn):
    """(eval id, vector) -> EvalMatrix, rows sorted by id so the result is deterministic."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, element):
        acc.append(element)
        return acc

    def merge_accumulators(self, accumulators):
        out = []
        for a in accumulators:
            out.extend(a)
        return out

    def extract_output(self, acc):
        acc = sorted(acc, key=lambda kv: kv[0])
        if not acc:
            return EvalMatrix([], np.zeros((0, 0), np.float32))
        return EvalMatrix([k for k, _ in acc], np.stack([v for _, v in acc]).astype(np.float32))


def to_sample(c: Candidate, decoded, similarity: Optional[float], nearest: Optional[str]) -> Sample:
    image = c.image or b""
    return Sample(
        key=c.key,
        image=image,
        image_format=decoded.extension,
        width=decoded.width,
        height=decoded.height,
        image_sha256=hashlib.sha256(image).hexdigest(),
        url=c.url,
        caption=c.caption or "",
        qid=c.qid,
        title=c.title,
        entity_id=c.entity_id if c.entity_id is not None else -1,
        score=float(c.score or 0.0),
        rank=int(c.rank or 0),
        retrieval_rank=int(c.retrieval_rank or 0),
        max_eval_similarity=similarity,
        nearest_eval_id=nearest,
        source=c.source or "",
        meta_json=c.meta_json,
    )


class DropNearDuplicates(beam.DoFn):
    """A batch of ((Candidate, DecodedImage), vector) -> Sample, or a Reject when its maximum
    cosine with any evaluation image is strictly greater than `threshold`.

    Exact search: one float32 matrix product per batch against all evaluation vectors. The
    comparison is done in float32, the precision of the embeddings: a similarity equal to
    float32(threshold) is kept.
    """

    STAGE = "decontaminate"

    def __init__(self, threshold: float):
        self.threshold = np.float32(threshold)

    def process(self, batch, eval_matrix: EvalMatrix):
        vectors = np.stack([v for _, v in batch]).astype(np.float32, copy=False)
        if len(eval_matrix.ids):
            sims = vectors @ eval_matrix.vectors.T
            best = sims.argmax(axis=1)
            best_sim = sims[np.arange(len(batch)), best]
        else:
            best = np.zeros(len(batch), dtype=np.int64)
            best_sim = np.full(len(batch), -np.inf, dtype=np.float32)
        for ((cand, decoded), _), j, s in zip(batch, best, best_sim):
            nearest = eval_matrix.ids[j] if len(eval_matrix.ids) else None
            sim = float(s) if np.isfinite(s) else None
            if s > self.threshold:
                _counter("decontaminate_dropped").inc()
                yield beam.pvalue.TaggedOutput(
                    REJECTED,
                    Reject(
                        stage=self.STAGE,
                        reason="near_duplicate_of_eval",
                        detail=f"cosine {float(s):.6f} > {float(self.threshold)} with eval image {nearest}",
                        key=cand.key,
                        source=cand.source,
                        record_json=truncate_json(
                            {"eval_id": nearest, "similarity": float(s), "qid": cand.qid, "url": cand.url, "caption": cand.caption}
                        ),
                    ),
                )
            else:
                _counter("decontaminate_kept").inc()
                yield to_sample(cand, decoded, sim, nearest)
