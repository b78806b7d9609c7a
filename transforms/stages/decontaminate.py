"""Decontamination against evaluation images (GER: drop every training image whose CLIP
image embedding has cosine > 0.95 with any OVEN val/test image).

Pieces:
  ReadCandidateImages  select_candidates Parquet (image column) or img2dataset webdataset
                       shards downloaded from its caption-only output -> Candidate
  ListEvalImages       a folder, a glob, or OVEN annotation JSON lines + an image root
                       -> (eval id, path), matched and read inside the pipeline
  DecodeImages         bytes -> (record, DecodedImage); bad images -> Reject with the reason
  EmbedImages          decode -> CLIP vectors, the chain the eval set and the candidates share
  StackEval, WriteEvalSet  eval vectors -> one EvalMatrix -> eval_set/embeddings.npy + ids.json
  EvalMatrixHandler    exact nearest eval image (one matrix product per batch), loaded once
                       per machine when shared across SDK processes
  DropNearDuplicates   kept -> Sample, dropped -> Reject naming the eval image and similarity
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
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from transforms.formats import parquet, safe_json
from transforms.formats.files import open_read
from transforms.formats.keys import image_identity, row_group_source, source_tag
from transforms.formats.media import IMAGE_SUFFIXES
from transforms.formats.webdataset import (
    TarDamage,
    TarMemberRef,
    damage_reason,
    iter_samples,
    webdataset_corpus_key,
)
from transforms.io.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageError,
    data_url,
    decode_image,
    small_jpeg,
)
from transforms.io.readers import REJECTED, ListFiles
from transforms.io.retry import read_guarded, retry_stream
from transforms.io.writers import DeadLetters
from transforms.run.progress import counter
from transforms.run.shuffles import MeasureShuffle
from transforms.schema import Candidate, Reject, Sample, from_row, truncate_json

log = logging.getLogger(__name__)


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

    Keys follow the corpus identity rule (`formats.keys.image_identity`): img2dataset's own keys
    (tars, its parquet output) are qualified by their file below `root`; select_candidates
    output already carries qualified keys and keeps them.
    """

    STAGE = "read_candidates"

    def __init__(self, root: str = ""):
        self.root = root

    def process(self, element):
        source = element[0] if isinstance(element, tuple) else element

        def unreadable(e):
            # A broken file is a reject, not a crash; I/O errors are retried, then raised.
            counter("candidate_files_unreadable").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                _reject(self.STAGE, "unreadable_file", f"{type(e).__name__}: {e}"[:500], source=source, count=0),
            )

        make = (lambda: self._parquet(*element)) if isinstance(element, tuple) else (lambda: self._tar(element))
        if isinstance(element, tuple) and len(element) == 3:
            make = lambda: self._download_failures(*element[:2])  # noqa: E731
        yield from read_guarded(make, source, unreadable)

    def _emit(self, row: dict, source: str):
        counter("candidates_read").inc()
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
            rows = parquet.read_rows(f, rg)
        img2dataset = bool(rows) and "image" not in rows[0]
        tag = source_tag(path, self.root)
        for row in rows:
            if img2dataset:
                row["key"] = image_identity(row.get("key"), row.get("url"), tag)
            yield self._emit(row, row_group_source(path, rg))

    def _download_failures(self, path: str, rg: int):
        """img2dataset's metadata Parquet beside a tar: the URLs it could not download are
        rejects (`download_failed`, with img2dataset's status and error message); the rows
        it downloaded are the tar's samples, read there, and only counted here."""
        with open_read(path) as f:
            rows = parquet.read_rows(f, rg)
        tag = source_tag(path, self.root)
        source = row_group_source(path, rg)
        for row in rows:
            if row.get("status") == "success":
                counter("img2dataset_rows_in_tars").inc()
                continue
            row["key"] = image_identity(row.get("key"), row.get("url"), tag)
            row.pop("jpg", None)
            if row.get("status") is None:
                row["status"] = "missing"
            yield self._emit(row, source)

    def _tar(self, path: str):
        tag = source_tag(path, self.root)
        with open_read(path) as f:
            # Streaming: one sample's image in memory at a time.
            for s in iter_samples(f, path=path):
                if isinstance(s, TarDamage):
                    # The samples before the damage went on; the rest of the file is one reject.
                    counter("candidate_files_broken").inc()
                    yield beam.pvalue.TaggedOutput(
                        REJECTED,
                        _reject(self.STAGE, damage_reason(s.error),
                                f"after {s.samples} samples: {type(s.error).__name__}: {s.error}", source=path, count=0),
                    )
                    break
                if s.refused or s.bad_json:
                    counter("candidates_read").inc()
                    reason, detail = s.refused or ("bad_json", s.bad_json)
                    yield beam.pvalue.TaggedOutput(REJECTED, _reject(self.STAGE, reason, detail, s.key, path))
                    continue
                ident = image_identity(webdataset_corpus_key(s.key, s.meta), None, tag)
                if isinstance(s.image, TarMemberRef):  # larger than MAX_MEMBER_BYTES: never read
                    counter("candidates_read").inc()
                    yield beam.pvalue.TaggedOutput(
                        REJECTED, _reject(self.STAGE, "image_too_large", f"image member of {s.image.size} bytes", ident, path)
                    )
                    continue
                yield self._emit({**s.meta, "key": ident, "image": s.image}, path)


# --------------------------------------------------------------------------------------
# Evaluation images
# --------------------------------------------------------------------------------------


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def is_annotation_file(eval_images: str) -> bool:
    return eval_images.lower().endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def image_patterns(folder_or_glob: str) -> str:
    """A folder -> its images flat and one level down (OVEN's two-digit folders); a glob
    or a comma list as given."""
    out = []
    for p in folder_or_glob.split(","):
        if p and not any(ch in p for ch in "*?[") and (p.endswith("/") or os.path.isdir(p)):
            p = p.rstrip("/")
            out += [f"{p}/*", f"{p}/*/*"]
        elif p:
            out.append(p)
    return ",".join(out)


class _ParseAnnotation(beam.DoFn):
    """An OVEN annotation line -> its image id; a line without one is a reject."""

    def process(self, element):
        path, line = element
        if not line.strip():
            return
        counter("eval_annotation_lines").inc()
        try:
            obj = safe_json.loads(line)
            image_id = obj["image_id"]
            if image_id is None or str(image_id) == "":
                raise KeyError("image_id is empty")
        except (ValueError, KeyError, TypeError) as e:
            counter("eval_annotation_lines_bad").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED, _reject("eval_images", "bad_annotation", f"{type(e).__name__}: {e}"[:300], source=path, record=line[:500])
            )
            return
        yield str(image_id), None


def _match_annotation(element):
    image_id, joined = element
    if not list(joined["ann"]):
        return  # an image no annotation asks about
    counter("eval_images_listed").inc()
    paths = sorted(joined["path"])
    if not paths:
        yield beam.pvalue.TaggedOutput(
            REJECTED, _reject("eval_images", "eval_image_missing", f"no {image_id}.<ext> under --eval_image_root", image_id)
        )
        return
    yield image_id, paths[0]


def _ids_by_stem(element):
    """Files sharing a stem (a/x.jpg, b/x.jpg) would be one ambiguous id: use their paths."""
    stem, paths = element
    paths = sorted(paths)
    for path in paths:
        counter("eval_images_listed").inc()
        yield (stem if len(paths) == 1 else path), path


class ListEvalImages(beam.PTransform):
    """-> (eval id, path) of every evaluation image, with rejects on the REJECTED tag.

    `eval_images` is a folder or glob of images (id = file stem), or OVEN annotation JSON
    lines (`image_id` per line) whose images are found as `IMAGE_ID.<ext>` under
    `image_root`, flat or in sub-folders. Everything is read by the pipeline (Beam's file
    matching and text reading): a 500k-image evaluation set is not put into the job graph.
    `eval_images_listed` counts the images that must be checked.
    """

    def __init__(self, eval_images: str, image_root: Optional[str]):
        super().__init__()
        self.eval_images = eval_images
        self.image_root = image_root

    def expand(self, pbegin):

        suffixes = IMAGE_SUFFIXES
        if is_annotation_file(self.eval_images):
            images = (
                pbegin
                | "EvalImageFiles" >> ListFiles(image_patterns(self.image_root), suffixes=suffixes)
                | "ByStem" >> beam.Map(lambda path: (_stem(path), path))
            )
            lines = (
                pbegin
                | "AnnotationFiles" >> beam.Create([self.eval_images])
                | "ReadAnnotations" >> beam.io.ReadAllFromText(with_filename=True)
                | "ParseAnnotations" >> beam.ParDo(_ParseAnnotation()).with_outputs(REJECTED, main="ids")
            )
            matched = (
                {
                    "ann": lines.ids | "MeasureAnnIds" >> MeasureShuffle("join_eval_images"),
                    "path": images | "MeasurePaths" >> MeasureShuffle("join_eval_images"),
                }
                | "JoinImages" >> beam.CoGroupByKey()
                | "Match" >> beam.FlatMap(_match_annotation).with_outputs(REJECTED, main="items")
            )
            rejects = (lines[REJECTED], matched[REJECTED]) | "ListRejects" >> beam.Flatten()
            return matched.items, rejects
        items = (
            pbegin
            | "EvalImageFiles" >> ListFiles(image_patterns(self.eval_images), suffixes=suffixes)
            | "ByStem" >> beam.Map(lambda path: (_stem(path), path))
            | "MeasureStems" >> MeasureShuffle("eval_ids")
            | "GroupStems" >> beam.GroupByKey()
            | "Ids" >> beam.FlatMap(_ids_by_stem)
        )
        return items, pbegin | "NoListRejects" >> beam.Create([])


class ReadEvalImage(beam.DoFn):
    def process(self, element):
        eval_id, path = element

        def read():
            with open_read(path) as f:
                yield eval_id, f.read()

        # An I/O error is retried, then raised: an evaluation image that could not be read
        # must not pass as checked (decode errors are the decoder's rejects).
        yield from retry_stream(read, path)


# --------------------------------------------------------------------------------------
# Decoding, the eval matrix, the filter
# --------------------------------------------------------------------------------------


class DecodeImages(beam.DoFn):
    """(id, bytes) -> (id, DecodedImage); Candidate -> (Candidate, DecodedImage); a bad image
    is a Reject with the decoder's reason. `draft` > 0: JPEGs decode at the smallest DCT
    scale whose shorter side is still >= `draft` (the model's input side)."""

    def __init__(self, stage: str, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int = 0,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.stage = stage
        self.max_pixels = max_pixels
        self.max_image_bytes = max_image_bytes
        self.draft = (draft, draft) if draft and draft > 0 else None

    def process(self, item):
        if isinstance(item, Candidate):
            key, data, source = item.key, item.image, item.source
        else:
            key, data = item
            source = None
        try:
            decoded = decode_image(data, self.max_pixels, draft=self.draft, max_image_bytes=self.max_image_bytes)
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
        counter(f"{self.stage}_decoded").inc()
        # Eval images continue as their id alone: their bytes are not needed any more.
        yield (item if isinstance(item, Candidate) else key), decoded


def _without_pixels(item):
    record, decoded = item
    # The decoded pixels are needed only for the embedding; keep the facts, drop the pixels.
    return (record, dataclasses.replace(decoded, image=None)), decoded.image


class EmbedImages(beam.PTransform):
    """Images -> decoded -> CLIP vectors: the one chain both sides of decontaminate run.

    Input: (eval id, bytes) or Candidate (DecodeImages). Output: {"vectors": ((record,
    decoded facts without pixels), vector), "rejected": images that did not decode (stage
    `stage`) and batches the model failed on (stage `embed_stage`, reason embed_failed)}.
    `handler` is the CLIP image handler; `draft` the decode side (0 = full size)."""

    def __init__(self, stage: str, embed_stage: str, handler, max_pixels: int, draft: int, max_image_bytes: int):
        super().__init__()
        self.stage, self.embed_stage, self.handler = stage, embed_stage, handler
        self.decoder = DecodeImages(stage, max_pixels, draft, max_image_bytes)

    def expand(self, images):


        decoded = images | "Decode" >> beam.ParDo(self.decoder).with_outputs(REJECTED, main="images")
        embedded, dlq = (
            decoded.images
            | "Pixels" >> beam.Map(_without_pixels)
            | "Embed" >> RunInference(KeyedModelHandler(self.handler)).with_exception_handling()
        )
        failed = dlq.failed_inferences | "EmbedFailures" >> beam.ParDo(DeadLetters(self.embed_stage, "embed_failed"))
        return {
            "vectors": embedded | "Vectors" >> beam.Map(lambda kv: (kv[0], kv[1].inference)),
            "rejected": (decoded[REJECTED], failed) | "Rejects" >> beam.Flatten(),
        }


def eval_vector(item):
    """((eval id, decoded facts), vector) -> (eval id, vector), counted."""
    (eval_id, _facts), vec = item
    counter("eval_images_embedded").inc()
    return eval_id, vec


EVAL_THUMBNAILS = "thumbnails"


def eval_thumbnail(item) -> Optional[dict]:
    """(eval id, image bytes) -> {"key", "image": <= 128 px JPEG} for eval_set/thumbnails-*.parquet,
    or None when the image does not decode (the decoder's reject tells why)."""
    eval_id, data = item
    thumb = small_jpeg(data)
    return None if thumb is None else {"key": str(eval_id), "image": thumb}


class WriteEvalThumbnails(beam.PTransform):
    """(eval id, bytes) -> eval_set/thumbnails-*.parquet (`key`, `image`: small JPEGs), what the
    viewer shows next to a near-duplicate reject."""

    def __init__(self, eval_dir: str):
        super().__init__()
        self.eval_dir = eval_dir

    def expand(self, images):
        import pyarrow as pa

        schema = pa.schema([("key", pa.string()), ("image", pa.binary())])
        return (
            images
            | "Thumbnail" >> beam.Map(eval_thumbnail)
            | "Decoded" >> beam.Filter(lambda r: r is not None)
            | "Write" >> beam.io.WriteToParquet(f"{self.eval_dir}/{EVAL_THUMBNAILS}", schema, file_name_suffix=".parquet")
        )


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


EVAL_SET_DIR = "eval_set"
EVAL_VECTORS_FILE = "embeddings.npy"
EVAL_IDS_FILE = "ids.json"


class WriteEvalSet(beam.DoFn):
    """The one EvalMatrix -> `<folder>/embeddings.npy` + `ids.json` (row i is ids[i])."""

    def __init__(self, folder: str):
        self.folder = folder.rstrip("/")

    def process(self, matrix: EvalMatrix):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(matrix.vectors, dtype=np.float32))
        with FileSystems.create(f"{self.folder}/{EVAL_VECTORS_FILE}") as f:
            f.write(buf.getvalue())
        with FileSystems.create(f"{self.folder}/{EVAL_IDS_FILE}") as f:
            f.write(json.dumps(list(matrix.ids)).encode("utf-8"))
        yield len(matrix.ids)


def read_eval_set(folder: str) -> EvalMatrix:
    folder = folder.rstrip("/")
    with open_read(f"{folder}/{EVAL_IDS_FILE}") as f:
        ids = json.loads(f.read().decode("utf-8"))
    with open_read(f"{folder}/{EVAL_VECTORS_FILE}") as f:
        vectors = np.load(io.BytesIO(f.read()))
    if len(ids) != len(vectors):
        raise ValueError(f"{folder}: {len(ids)} ids but {len(vectors)} vectors")
    return EvalMatrix(ids, vectors.astype(np.float32, copy=False))


class EvalSearch:
    """Exact nearest evaluation image by cosine: one float32 matrix product per batch.

    Behind plain method calls, so Beam's cross-process proxy can serve one copy per
    machine (a 500k x 768 ViT-L matrix is 1.5 GB)."""

    def __init__(self, matrix: EvalMatrix):
        self.ids = list(matrix.ids)
        self.vectors = np.ascontiguousarray(matrix.vectors, dtype=np.float32)

    def nearest(self, queries: np.ndarray) -> list[tuple[Optional[str], Optional[float]]]:
        if not self.ids:
            return [(None, None)] * len(queries)
        sims = np.asarray(queries, dtype=np.float32) @ self.vectors.T
        best = sims.argmax(axis=1)
        return [(self.ids[j], float(sims[i, j])) for i, j in enumerate(best)]

    def size(self) -> int:
        return len(self.ids)


class EvalMatrixHandler(ModelHandler):
    """CLIP vector -> (nearest eval id, cosine), over the eval set written by the first
    phase of decontaminate; with `share_across_processes` one copy per machine."""

    def __init__(self, folder: str, *, batch_size: int = 256, share_across_processes: bool = False):
        super().__init__(min_batch_size=1, max_batch_size=batch_size, large_model=share_across_processes)
        self.folder = folder

    def load_model(self) -> EvalSearch:
        return EvalSearch(read_eval_set(self.folder))

    def run_inference(self, batch, model, inference_args=None):
        queries = np.ascontiguousarray(np.stack(batch).astype(np.float32, copy=False))
        for q, found in zip(batch, model.nearest(queries)):
            yield PredictionResult(q, found)

    def get_num_bytes(self, batch) -> int:
        return sum(v.nbytes for v in batch)

    def get_metrics_namespace(self) -> str:
        return "eval_search"


class DropNearDuplicates(beam.DoFn):
    """((Candidate, DecodedImage), PredictionResult(vector, (nearest eval id, cosine))) ->
    Sample, or a Reject when the cosine is strictly greater than `threshold`.

    The comparison is done in float32, the precision of the embeddings: a similarity equal
    to float32(threshold) is kept.
    """

    STAGE = "decontaminate"

    def __init__(self, threshold: float, thumbnails: bool = True):
        self.threshold = np.float32(threshold)
        # A dropped image keeps a <= 128 px JPEG (<= 8 KB) in its reject, so the viewer and
        # the audit show what was dropped next to the evaluation image it matched.
        self.thumbnails = thumbnails

    def process(self, element):
        (cand, decoded), result = element
        nearest, sim = result.inference
        s = np.float32(sim) if sim is not None else None
        if s is not None and s > self.threshold:
            counter("decontaminate_dropped").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                Reject(
                    stage=self.STAGE,
                    reason="near_duplicate_of_eval",
                    detail=f"cosine {float(s):.6f} > {float(self.threshold):.6g} with eval image {nearest}",
                    key=cand.key,
                    source=cand.source,
                    record_json=truncate_json(
                        {"eval_id": nearest, "similarity": round(float(s), 6), "qid": cand.qid, "title": cand.title, "url": cand.url,
                         "caption": cand.caption}
                    ),
                    thumbnail=data_url(small_jpeg(cand.image)) if self.thumbnails and cand.image else None,
                ),
            )
        else:
            counter("decontaminate_kept").inc()
            yield to_sample(cand, decoded, None if s is None else float(s), nearest)
