"""The faiss entity index behind a Beam `ModelHandler`: read from a local or remote path
with its calibrated search parameters, searched in batches through `RunInference`, and
(with `share_across_processes`) loaded once per machine and served to every SDK process."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

log = logging.getLogger(__name__)


def set_faiss_threads(threads) -> None:
    import faiss

    from transforms.run.job import resolve_threads

    threads = resolve_threads(threads)
    if threads > 0:
        faiss.omp_set_num_threads(threads)


def load_faiss_index(path: str, threads=0, nprobe: int = 0, params: Optional[dict] = None):
    """Read a faiss index from a local or remote (gs://) path, with its search parameters:
    `params` (the index manifest's calibrated ones, e.g. {"nprobe": 32}), overridden by an
    explicit `nprobe` > 0."""
    import faiss

    set_faiss_threads(threads)
    if "://" in path:
        tmp = tempfile.mkdtemp(prefix="faiss-")
        local = os.path.join(tmp, os.path.basename(path))
        with FileSystems.open(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        index = faiss.read_index(local)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        index = faiss.read_index(path)
    settings = dict(params or {})
    if nprobe > 0:
        settings["nprobe"] = nprobe
    for name, value in settings.items():
        try:
            faiss.ParameterSpace().set_index_parameter(index, name, value)
        except RuntimeError:
            log.info("index %s has no %s parameter; ignoring it", path, name)
    return index


class SearchableIndex:
    """A faiss index behind plain method calls, so Beam's cross-process proxy can serve it
    (the proxy forwards method calls, not attribute reads)."""

    def __init__(self, index):
        self.index = index

    def search(self, queries: np.ndarray, k: int):
        k = max(1, min(k, self.index.ntotal))
        return self.index.search(queries, k)

    def size(self) -> int:
        return int(self.index.ntotal)


class FaissSearchHandler(ModelHandler[np.ndarray, tuple[np.ndarray, np.ndarray], Any]):
    """query vector -> (entity int ids, inner-product scores) of its top-`k` entities.

    With `share_across_processes` the index is loaded once per machine and served to all
    SDK processes (Beam's multi-process shared model); `threads` should then be
    cores / processes so concurrent searches do not oversubscribe the machine.
    """

    def __init__(
        self,
        index_path: str,
        k: int,
        *,
        batch_size: int = 256,
        threads: int = 0,
        nprobe: int = 0,
        search_params: Optional[dict] = None,
        share_across_processes: bool = False,
    ):
        super().__init__(
            min_batch_size=batch_size,
            max_batch_size=batch_size,
            large_model=share_across_processes,
        )
        self.index_path = index_path
        self.k = k
        self.threads = threads
        self.nprobe = nprobe
        self.search_params = dict(search_params or {})

    def load_model(self):
        return SearchableIndex(load_faiss_index(self.index_path, self.threads, self.nprobe, self.search_params))

    def run_inference(
        self, batch: Sequence[np.ndarray], model, inference_args: Optional[dict] = None
    ) -> Iterable[PredictionResult]:
        queries = np.ascontiguousarray(np.stack(batch).astype(np.float32, copy=False))
        scores, ids = model.search(queries, self.k)
        for q, i, s in zip(batch, ids, scores):
            keep = i >= 0
            yield PredictionResult(q, (i[keep], s[keep]))

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(v.nbytes for v in batch)

    def get_metrics_namespace(self) -> str:
        return "faiss_search"
