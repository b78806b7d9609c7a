"""Entity index: catalog dedup, title embedding parts, and the final single-writer step that
assigns dense int ids in file order and builds the faiss index.

Layout of an entity index directory (what `select_candidates` and `ground` read):

    entities.parquet   int_id, qid, title, summary, extra_json, file_index, row (sorted by int_id)
    embeddings.npy     float32 [N, dim], L2-normalised, row i = int_id i
    entities.faiss     faiss index over the same rows (inner product = cosine)
    manifest.json      model, dimension, counts, index string, code version
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import tempfile
import uuid
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.errors import UsageError
from transforms.formats.files import read_json, write_json
from transforms.io.readers import REJECTED
from transforms.models.faiss_index import set_faiss_threads
from transforms.run.progress import counter
from transforms.run.version import code_version
from transforms.schema import Entity, Reject, arrow_schema, to_row, truncate_json

log = logging.getLogger(__name__)

ENTITIES_FILE = "entities.parquet"
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "entities.faiss"
MANIFEST_FILE = "manifest.json"
ENTITY_ROWS_PER_GROUP = 262_144
PARTS_DIR = "_parts"


def title_text(title: str) -> str:
    """The text embedded for an entity: its title with Wikipedia underscores as spaces."""
    return " ".join(title.replace("_", " ").split())


class CollapseDuplicateQids(beam.DoFn):
    """(qid, [Entity]) -> the first occurrence in file order; later ones are reported."""

    STAGE = "dedup"

    def __init__(self):
        self.unique = counter("entities_unique")

    def process(self, element):
        qid, entities = element
        ordered = sorted(entities, key=lambda e: (e.file_index, e.row))
        first = ordered[0]
        self.unique.inc()
        yield first
        for dup in ordered[1:]:
            same = "same title" if dup.title == first.title else f"title {dup.title!r}"
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                Reject(
                    stage=self.STAGE,
                    reason="duplicate_qid",
                    detail=(
                        f"{qid} at file {dup.file_index} row {dup.row} ({same}) collapsed into "
                        f"file {first.file_index} row {first.row} ({first.title!r})"
                    ),
                    key=qid,
                    record_json=truncate_json(to_row(dup)),
                ),
            )


def _part_schema(dim: int) -> pa.Schema:
    schema = arrow_schema(Entity)
    return schema.append(pa.field("vector", pa.list_(pa.float32(), dim)))


class WriteVectorPart(beam.DoFn):
    """A batch of (Entity, vector) -> one Parquet part file under <output>/_parts/; yields
    its path. A retried bundle leaves an orphan part that nothing references; the final
    step reads only the paths it is given and removes the folder."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def process(self, batch):
        if not batch:
            return
        dim = int(len(batch[0][1]))
        rows = [to_row(e) for e, _ in batch]
        table = pa.Table.from_pylist(rows, schema=arrow_schema(Entity))
        vectors = np.stack([v for _, v in batch]).astype(np.float32, copy=False)
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        table = table.append_column(
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.FixedSizeListArray.from_arrays(flat, dim),
        )
        path = FileSystems.join(self.output_dir, PARTS_DIR, f"part-{uuid.uuid4().hex}.parquet")
        with FileSystems.create(path) as f:
            pq.write_table(table, f)
        counter("entities_embedded").inc(len(batch))
        yield path


@contextlib.contextmanager
def _local_output(output_dir: str, name: str):
    """A local path to write `name` to; uploaded to output_dir when that is remote."""
    if "://" not in output_dir:
        os.makedirs(output_dir, exist_ok=True)
        yield os.path.join(output_dir, name)
        return
    tmp = tempfile.mkdtemp(prefix="entity-index-")
    local = os.path.join(tmp, name)
    try:
        yield local
        with open(local, "rb") as src, FileSystems.create(
            FileSystems.join(output_dir, name)
        ) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_faiss_index(dim: int, factory: str):
    """An empty inner-product index from a faiss index_factory string; UsageError if invalid."""
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1][:200]
        raise UsageError(
            f"--index_factory {factory!r} is not a valid faiss index string for {dim}-d vectors "
            f"({reason}). Examples: Flat, IVF4096,Flat, IVF16384,SQ8, IVF4096,PQ48 (dim divisible by 48), HNSW32"
        ) from e


def ivf_lists(index) -> int:
    """nlist of an IVF index (0 for any other)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


# faiss's k-means warns below 39 training points per centroid; 50 leaves a margin.
MIN_POINTS_PER_LIST = 39
AUTO_POINTS_PER_LIST = 50
AUTO_TRAIN_SAMPLE = 1_000_000


def train_sample_size(index, n: int, requested: int) -> tuple[int, Optional[str]]:
    """(vectors to train on, a warning or None). `requested` 0 = auto: max(50 x nlist, 1M)
    (faiss advises at least 39 x nlist; PQ codebooks want ~10k points each); never more
    than the catalog."""
    nlist = ivf_lists(index)
    # PQ codebooks want ~10k points each and IVF cells 39+, so auto never goes below 1M.
    take = requested if requested > 0 else max(AUTO_POINTS_PER_LIST * nlist, AUTO_TRAIN_SAMPLE)
    take = min(n, take)
    warning = None
    if nlist and take < MIN_POINTS_PER_LIST * nlist:
        warning = (
            f"training IVF{nlist} on {take:,} vectors, below faiss's advised {MIN_POINTS_PER_LIST} x nlist = "
            f"{MIN_POINTS_PER_LIST * nlist:,}: the cells are poorly placed and recall drops; "
            + ("use fewer lists for this catalog" if n < MIN_POINTS_PER_LIST * nlist else "raise --train_sample (0 = auto)")
        )
    return take, warning


def build_faiss_index(vectors: np.ndarray, factory: str, train_sample: int, seed: int):
    n, dim = vectors.shape
    index = new_faiss_index(dim, factory)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        take, warning = train_sample_size(index, n, train_sample)
        if warning:
            log.warning(warning)
        sample = np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)
        train = np.ascontiguousarray(vectors[sample])
        try:
            index.train(train)
        except RuntimeError as e:
            raise UsageError(
                f"--index_factory {factory!r} could not be trained on {take} vectors: {e}. "
                "IVF<n> needs at least n (better 39*n) entities; use Flat for small catalogs"
            ) from e
    chunk = 65536
    for start in range(0, n, chunk):
        index.add(np.ascontiguousarray(vectors[start : start + chunk]))
    return index


def search_parameter(index) -> Optional[str]:
    """The faiss knob that trades recall for speed: nprobe (IVF), efSearch (HNSW)."""
    import faiss

    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    if "HNSW" in type(faiss.downcast_index(index)).__name__:
        return "efSearch"
    return None


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 16_384) -> np.ndarray:
    """Ids of the exact top-k by inner product, streaming over (memory-mapped) vectors in
    chunks small enough that the score block stays ~64 MB for 1,000 queries."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.asarray(vectors[start : start + chunk], dtype=np.float32)
        s = queries @ block.T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
    return best_i


def calibration_queries(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Caption-like queries: catalog vectors moved to cosine ~0.7 of themselves by isotropic
    noise (a caption that names an entity scores 0.5-0.8 against its title; an entity's own
    vector would find itself in its own cell and say nothing about recall)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))
    base = np.asarray(vectors[rows], dtype=np.float32)
    noise = rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(base.shape[1])
    q = base + noise
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def calibrate_search(
    index, vectors: np.ndarray, *, k: int = 10, n_queries: int = 1000, target_recall: float = 0.95, seed: int = 0
) -> Optional[dict]:
    """Recall@k against exact search for each value of the index's search knob (the whole
    curve, written to the manifest), and the smallest value that reaches `target_recall`
    (faiss's default nprobe = 1 silently loses recall). None for an exact index."""
    import time

    import faiss

    param = search_parameter(index)
    if param is None:
        return None
    queries = calibration_queries(vectors, n_queries, seed)
    k = min(k, index.ntotal)
    truth = exact_top_k(vectors, queries, k)
    space = faiss.ParameterSpace()
    if param == "nprobe":
        top = ivf_lists(index)
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v < top] + [top]
    else:
        values = [16, 32, 64, 128, 256, 512]
    curve = []
    chosen = None
    for v in values:
        space.set_index_parameter(index, param, v)
        started = time.perf_counter()
        _, got = index.search(queries, k)
        seconds = time.perf_counter() - started
        recall = float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got.tolist(), truth.tolist())]))
        curve.append({param: v, f"recall_at_{k}": round(recall, 4), "ms_per_query": round(1000 * seconds / len(queries), 4)})
        if chosen is None and recall >= target_recall:
            chosen = v
    if chosen is None:
        chosen = values[-1]
        log.warning("no %s reaches recall@%d >= %.2f (best %.3f at %s=%d)", param, k, target_recall, curve[-1][f"recall_at_{k}"], param, chosen)
    space.set_index_parameter(index, param, chosen)
    return {
        "params": {param: chosen},
        "target_recall": target_recall,
        "k": k,
        "queries": len(queries),
        "queries_are": "catalog vectors moved to cosine ~0.7 by isotropic noise",
        "recall_curve": curve,
    }


def finalize_entity_index(
    part_paths: list[str],
    output_dir: str,
    *,
    factory: str,
    train_sample: int,
    seed: int,
    model_name: str,
    inputs: list[str],
    threads=0,
    target_recall: float = 0.95,
) -> dict:
    """Dense int ids in catalog order, entities.parquet, embeddings.npy, the faiss index and
    manifest.json from the vector parts. Holds in its heap one part, the id arrays (16
    bytes an entity) and a 256k-row slice of the entity table; the embeddings and the
    table are memory-mapped files; then the faiss index (a flat 6M x 384 index: 9.2 GB)."""
    import faiss


    set_faiss_threads(threads)
    part_paths = sorted(set(part_paths))
    if not part_paths:
        raise UsageError(
            "no valid entity was read from --entities: every row was rejected; "
            f"see {output_dir}/rejected/"
        )
    positions = []
    for p in part_paths:
        with FileSystems.open(p) as f:
            t = pq.read_table(f, columns=["file_index", "row"])
        positions.append((t["file_index"].to_numpy(), t["row"].to_numpy()))
    file_index = np.concatenate([fi for fi, _ in positions]).astype(np.int64)
    row = np.concatenate([r for _, r in positions]).astype(np.int64)
    n = len(row)
    order = np.lexsort((row, file_index))
    int_ids = np.empty(n, dtype=np.int64)
    int_ids[order] = np.arange(n, dtype=np.int64)

    dim = None
    tmp = tempfile.mkdtemp(prefix="entity-embeddings-")
    try:
        emb_local = os.path.join(tmp, EMBEDDINGS_FILE)
        rows_local = os.path.join(tmp, "rows.arrow")
        vectors = None
        offset = 0
        # Pass 1, one part in memory at a time: vectors into the memory-mapped matrix at
        # their int id, the other columns appended to an on-disk Arrow file.
        writer = None
        for p in part_paths:
            with FileSystems.open(p) as f:
                t = pq.read_table(f)
            m = t.num_rows
            ids = int_ids[offset : offset + m]
            offset += m
            vec_col = t["vector"].combine_chunks()
            if dim is None:
                dim = vec_col.type.list_size
                vectors = np.lib.format.open_memmap(
                    emb_local, mode="w+", dtype=np.float32, shape=(n, dim)
                )
            vectors[ids] = vec_col.flatten().to_numpy(zero_copy_only=False).reshape(m, dim)
            rows = t.drop(["vector"]).set_column(t.schema.get_field_index("int_id"), "int_id", pa.array(ids, pa.int64()))
            if writer is None:
                writer = pa.ipc.new_file(rows_local, rows.schema)
            writer.write_table(rows)
            del t, vec_col, rows
        writer.close()
        vectors.flush()
        # Pass 2: entities.parquet in int id order, from the memory-mapped Arrow file in
        # slices, so titles, summaries and extra fields are never all in this process's heap.
        with pa.memory_map(rows_local) as source:
            reader = pa.ipc.open_file(source)
            # One record batch per part. Table.take on a many-chunk table would first
            # concatenate whole columns into the heap; taking from each batch (zero-copy on
            # the map) and reordering the small result keeps a slice in memory, not the table.
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            starts = np.cumsum([0] + [b.num_rows for b in batches])
            all_ids = np.concatenate([b.column("int_id").to_numpy() for b in batches]) if batches else np.zeros(0, np.int64)
            order = np.argsort(all_ids, kind="stable")
            with _local_output(output_dir, ENTITIES_FILE) as path:
                with pq.ParquetWriter(path, reader.schema) as out:
                    for start in range(0, n, ENTITY_ROWS_PER_GROUP):
                        rows = order[start : start + ENTITY_ROWS_PER_GROUP]
                        which = np.searchsorted(starts, rows, side="right") - 1
                        pieces, positions = [], []
                        for b in np.unique(which):
                            mine = np.nonzero(which == b)[0]
                            pieces.append(batches[b].take(pa.array(rows[mine] - starts[b])))
                            positions.append(mine)
                        chunk = pa.Table.from_batches(pieces).combine_chunks()
                        back = np.empty(len(rows), dtype=np.int64)
                        back[np.concatenate(positions)] = np.arange(len(rows))
                        out.write_table(chunk.take(pa.array(back)))
            del batches, reader
        index = build_faiss_index(vectors, factory, train_sample, seed)
        search = calibrate_search(index, vectors, target_recall=target_recall, seed=seed)
        with _local_output(output_dir, INDEX_FILE) as path:
            faiss.write_index(index, path)
        del vectors
        with _local_output(output_dir, EMBEDDINGS_FILE) as path:
            shutil.move(emb_local, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    manifest = {
        "kind": "entity_index",
        "model": model_name,
        "dimension": int(dim),
        "normalized": True,
        "metric": "inner_product",
        "num_entities": int(n),
        "index_factory": factory,
        "index_ntotal": int(index.ntotal),
        # What select_candidates and grounding set on the index unless told otherwise.
        "search": search or {"params": {}, "exact": True},
        "files": {
            "entities": ENTITIES_FILE,
            "embeddings": EMBEDDINGS_FILE,
            "index": INDEX_FILE,
        },
        "inputs": inputs,
        "code_version": code_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_json(FileSystems.join(output_dir, MANIFEST_FILE), manifest)
    for p in part_paths:
        with contextlib.suppress(Exception):
            FileSystems.delete([p])
    if "://" not in output_dir:
        shutil.rmtree(os.path.join(output_dir, PARTS_DIR), ignore_errors=True)
    return manifest


class FinalizeEntityIndex(beam.DoFn):
    def __init__(self, output_dir: str, **kwargs):
        self.output_dir = output_dir
        self.kwargs = kwargs

    def process(self, part_paths):
        yield finalize_entity_index(list(part_paths), self.output_dir, **self.kwargs)


def read_manifest(entity_index_dir: str, flag: str = "--entity_index") -> dict:

    path = FileSystems.join(entity_index_dir, MANIFEST_FILE)
    if not FileSystems.exists(path):
        raise UsageError(
            f"{flag}: {entity_index_dir!r} is not an entity index (no {MANIFEST_FILE}); "
            "build one with: python -m pipelines.build_entity_index --entities PATH --output DIR"
        )
    manifest = read_json(path)
    for name in manifest.get("files", {}).values():
        if not FileSystems.exists(FileSystems.join(entity_index_dir, name)):
            raise UsageError(f"{flag}: {entity_index_dir!r} is incomplete: {name} is missing")
    return manifest
