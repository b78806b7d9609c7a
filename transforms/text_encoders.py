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


def export_encoder(model_name: str, output_dir: str, backend: str) -> dict:
    """Export `model_name` (a sentence-transformers id or path) to `output_dir` (local or
    remote) as an ONNX encoder; returns its config."""
    import torch

    from transforms.common import UsageError
    from transforms.embedding import load_sentence_transformer

    if backend == "static":
        return distill_static(model_name, output_dir)
    if backend not in ("onnx", "onnx-int8"):
        raise ValueError(backend)
    model = load_sentence_transformer(model_name, threads=1)
    modules = list(model)
    transformer = modules[0]
    pooling = next((m for m in modules if type(m).__name__ == "Pooling"), None)
    mode = "mean"
    if pooling is not None:
        cfg = pooling.get_config_dict()
        # sentence-transformers >= 5 says `pooling_mode`; older ones a flag per mode.
        named = cfg.get("pooling_mode")
        if isinstance(named, str):
            mode = {"mean": "mean", "cls": "cls"}.get(named)
        else:
            mode = "cls" if cfg.get("pooling_mode_cls_token") else "mean" if cfg.get("pooling_mode_mean_tokens") else None
    if mode is None or not hasattr(transformer, "auto_model"):
        raise UsageError(
            f"--text_backend {backend}: {model_name} is not a transformer with mean or CLS pooling; "
            "use --text_backend torch for it"
        )
    normalize = any(type(m).__name__ == "Normalize" for m in modules)

    class Graph(torch.nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask):
            h = self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if mode == "cls":
                v = h[:, 0]
            else:
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            # Always normalised: the index and the search use inner products of unit vectors.
            return torch.nn.functional.normalize(v, dim=-1)

    graph = Graph(transformer.auto_model).eval()
    tmp = tempfile.mkdtemp(prefix="onnx-encoder-")
    try:
        sample = model.tokenizer(["an example", "a second, longer example title"], padding=True, return_tensors="pt")
        fp32 = os.path.join(tmp, "fp32.onnx")
        with torch.no_grad():
            torch.onnx.export(
                graph,
                (sample["input_ids"], sample["attention_mask"]),
                fp32,
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                              "embedding": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        final = os.path.join(tmp, ONNX_FILE)
        if backend == "onnx-int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(fp32, final, weight_type=QuantType.QInt8)
        else:
            shutil.move(fp32, final)
        tok_dir = os.path.join(tmp, "tok")
        model.tokenizer.save_pretrained(tok_dir)
        shutil.copy(os.path.join(tok_dir, TOKENIZER_FILE), os.path.join(tmp, TOKENIZER_FILE))
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        config = {
            "backend": backend,
            "source_model": model_name,
            "pooling": mode,
            "source_normalizes": normalize,
            "max_seq_length": int(model.max_seq_length),
            "dimension": int(get_dim()),
            "pad_id": int(model.tokenizer.pad_token_id or 0),
            "sha256": _sha256(final),
        }
        with open(os.path.join(tmp, ENCODER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        for name in (ONNX_FILE, TOKENIZER_FILE, ENCODER_CONFIG):
            _copy_out(os.path.join(tmp, name), FileSystems.join(output_dir, name))
        return config
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_out(local: str, dest: str) -> None:
    if "://" not in dest:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(local, dest)
        return
    with open(local, "rb") as src, FileSystems.create(dest) as dst:
        shutil.copyfileobj(src, dst, 1 << 24)


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


def distill_static(model_name: str, output_dir: str, batch: int = 512, vocabulary: int = 0) -> dict:
    """Each vocabulary token through the model on its own ([CLS] token [SEP], the model's
    pooling, normalised): the token's static vector. A text is then the mean of its tokens'
    vectors, normalised (model2vec's idea, without its PCA and weighting)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding

    from transforms.embedding import load_sentence_transformer

    model = load_sentence_transformer(model_name, threads=0)
    tok = model.tokenizer
    size = len(tok.get_vocab())
    todo = min(size, vocabulary) if vocabulary else size  # tests distil a slice; the rest stays zero
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    weights = np.zeros((size, int(get_dim())), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, todo, batch):
            ids = torch.arange(start, min(todo, start + batch)).unsqueeze(1)
            parts = [ids] if cls_id is None else [torch.full_like(ids, cls_id), ids, torch.full_like(ids, sep_id)]
            input_ids = torch.cat(parts, dim=1)
            features = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                        "token_type_ids": torch.zeros_like(input_ids)}
            weights[start : start + len(ids)] = model.forward(features)["sentence_embedding"].float().numpy()
    static = SentenceTransformer(modules=[StaticEmbedding(tok.backend_tokenizer, embedding_weights=weights), Normalize()],
                                 device="cpu")
    tmp = tempfile.mkdtemp(prefix="static-encoder-")
    try:
        static.save(os.path.join(tmp, STATIC_DIR))
        config = {"backend": "static", "source_model": model_name, "dimension": int(weights.shape[1]),
                  "vocabulary": size, "sha256": _tree_sha256(os.path.join(tmp, STATIC_DIR))}
        with open(os.path.join(tmp, ENCODER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        for root, _, files in os.walk(tmp):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), tmp)
                _copy_out(os.path.join(root, name), FileSystems.join(output_dir, *rel.split(os.sep)))
        return config
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    from transforms.common import UsageError

    have = backend_of(manifest)
    if requested and requested != have:
        raise UsageError(
            f"{flag} {requested}: the entity index was embedded with the {have} encoder; vectors of another "
            f"encoder do not compare with it. Leave {flag} out (the index's encoder is used), or rebuild the "
            f"index with build_entity_index {flag} {requested}"
        )
