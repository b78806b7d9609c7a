"""Faster text encoders derived from a sentence-transformer, carried by the entity index.

* `onnx` / `onnx-int8`: the model exported to ONNX (int8: weights quantised, activations
  quantised per pass at run time), run with onnxruntime;
* `static`: a static-embedding model distilled here from the model (each vocabulary
  token's output vector, averaged over a text's tokens: no attention, ~100x cheaper), run
  by sentence-transformers' own `StaticEmbedding`.

`build_entity_index --text_backend onnx|onnx-int8` exports the model once, on the launcher,
into the index's `text_encoder/` folder: `model.onnx` (the transformer, mean or CLS
pooling and L2 normalisation in one graph), `tokenizer.json` and `encoder.json` (backend,
source model, pooling, maximum length, dimension, sha256 of the graph). The index's
manifest points at it, and select_candidates, grounding and refine's grounder load that
very file: both sides of every cosine come from the same encoder.

`OnnxEncoder` answers the part of the `SentenceTransformer` interface this package uses
(`encode`, `tokenizer`, `max_seq_length`, `get_sentence_embedding_dimension`), so the
length-grouped handler runs it unchanged. Workers need onnxruntime and tokenizers, not
torch. int8 is onnxruntime's dynamic quantisation of the weights (activations quantised
per batch at run time); what it costs in selection quality is measured in
benchmarks/encoder_bench.py --quality.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8", "static")
STATIC_DIR = "static"
ENCODER_DIR = "text_encoder"
ENCODER_CONFIG = "encoder.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


def is_encoder_dir(path: str) -> bool:
    try:
        return FileSystems.exists(FileSystems.join(path, ENCODER_CONFIG))
    except Exception:  # noqa: BLE001 - not a path Beam knows: a model id
        return False


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Tokenizer:
    """The slice of a Hugging Face tokenizer's call interface `token_lengths` uses."""

    def __init__(self, tok, max_len: int):
        self.tok = tok
        self.max_len = max_len

    def __call__(self, texts, **_):
        return {"input_ids": [e.ids for e in self.tok.encode_batch(list(texts))]}


class OnnxEncoder:
    def __init__(self, folder: str, threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        local, tmp = folder, None
        if "://" in folder:
            tmp = local = tempfile.mkdtemp(prefix="onnx-encoder-")
            for name in (ONNX_FILE, TOKENIZER_FILE, ENCODER_CONFIG):
                with FileSystems.open(FileSystems.join(folder, name)) as src, open(os.path.join(local, name), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
        try:
            with open(os.path.join(local, ENCODER_CONFIG)) as f:
                self.config = json.load(f)
            if _sha256(os.path.join(local, ONNX_FILE)) != self.config["sha256"]:
                raise OSError(f"{folder}/{ONNX_FILE} does not match the sha256 in {ENCODER_CONFIG}: a damaged copy")
            self.max_seq_length = int(self.config["max_seq_length"])
            tok = Tokenizer.from_file(os.path.join(local, TOKENIZER_FILE))
            tok.enable_truncation(self.max_seq_length)
            tok.no_padding()
            self._tok = tok
            self.tokenizer = _Tokenizer(tok, self.max_seq_length)
            so = ort.SessionOptions()
            if threads and threads > 0:
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
            self.session = ort.InferenceSession(os.path.join(local, ONNX_FILE), so, providers=["CPUExecutionProvider"])
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.config["dimension"])

    get_embedding_dimension = get_sentence_embedding_dimension

    def encode(self, texts: Sequence[str], batch_size: int = 32, normalize_embeddings: bool = True,
               convert_to_numpy: bool = True, show_progress_bar: bool = False, **_) -> np.ndarray:
        """Unit vectors of `texts`, `batch_size` at a time, each pass padded to its longest."""
        out = np.empty((len(texts), self.get_sentence_embedding_dimension()), dtype=np.float32)
        pad = int(self.config.get("pad_id", 0))
        for start in range(0, len(texts), max(1, batch_size)):
            enc = self._tok.encode_batch(list(texts[start : start + batch_size]))
            width = max(len(e.ids) for e in enc)
            ids = np.full((len(enc), width), pad, dtype=np.int64)
            mask = np.zeros((len(enc), width), dtype=np.int64)
            for i, e in enumerate(enc):
                ids[i, : len(e.ids)] = e.ids
                mask[i, : len(e.ids)] = 1
            out[start : start + len(enc)] = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out


def _tree_sha256(folder: str) -> str:
    """One digest over a folder's files (names and contents)."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode() + _sha256(path).encode())
    return digest.hexdigest()


def _load_static(folder: str, threads: int, expected: str):
    from sentence_transformers import SentenceTransformer

    local, tmp = folder, None
    if "://" in folder:
        tmp = local = tempfile.mkdtemp(prefix="static-encoder-")
        prefix = FileSystems.join(folder, STATIC_DIR)
        for m in FileSystems.match([prefix + "/**"])[0].metadata_list:
            rel = m.path[len(folder.rstrip("/")) + 1 :]
            os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
            with FileSystems.open(m.path) as src, open(os.path.join(local, rel), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
    try:
        if threads and threads > 0:
            import torch

            torch.set_num_threads(threads)
        if _tree_sha256(os.path.join(local, STATIC_DIR)) != expected:
            raise OSError(f"{folder}/{STATIC_DIR} does not match the sha256 in {ENCODER_CONFIG}: a damaged copy")
        return SentenceTransformer(os.path.join(local, STATIC_DIR), device="cpu")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def load_encoder_dir(folder: str, threads: int = 0):
    with FileSystems.open(FileSystems.join(folder, ENCODER_CONFIG)) as f:
        config = json.load(f)
    if config.get("backend") == "static":
        return _load_static(folder, threads, config["sha256"])
    return OnnxEncoder(folder, threads)


def index_encoder(manifest: dict, index_dir: str) -> str:
    """What to load to embed text for an entity index: its ONNX encoder folder when it was
    built with one, else its sentence-transformers model."""
    enc = manifest.get("text_encoder")
    if enc:
        return FileSystems.join(index_dir.rstrip("/"), enc)
    return manifest["model"]


def backend_of(manifest: dict) -> str:
    return manifest.get("text_backend", "torch")


def check_backend(requested: Optional[str], manifest: dict, flag: str = "--text_backend") -> None:
    from transforms.errors import UsageError

    have = backend_of(manifest)
    if requested and requested != have:
        raise UsageError(
            f"{flag} {requested}: the entity index was embedded with the {have} encoder; vectors of another "
            f"encoder do not compare with it. Leave {flag} out (the index's encoder is used), or rebuild the "
            f"index with build_entity_index {flag} {requested}"
        )
