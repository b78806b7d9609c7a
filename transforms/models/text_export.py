"""Making the faster text encoders (see `transforms.models.text_encoder`): exported to ONNX or
distilled to static embeddings, once, on the launcher, by `build_entity_index --text_backend`.
Loading them lives in `transforms.models.text_encoder`; this module is the only one that needs the
torch sentence-transformer to build them, so loading never imports it back."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms.models.embedding import load_sentence_transformer
from transforms.models.text_encoder import (
    ENCODER_CONFIG,
    ONNX_FILE,
    STATIC_DIR,
    TOKENIZER_FILE,
    _sha256,
    _tree_sha256,
)


def export_encoder(model_name: str, output_dir: str, backend: str) -> dict:
    """Export `model_name` (a sentence-transformers id or path) to `output_dir` (local or
    remote) as an ONNX encoder; returns its config."""
    import torch

    from transforms.errors import UsageError
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


def distill_static(model_name: str, output_dir: str, batch: int = 512, vocabulary: int = 0) -> dict:
    """Each vocabulary token through the model on its own ([CLS] token [SEP], the model's
    pooling, normalised): the token's static vector. A text is then the mean of its tokens'
    vectors, normalised (model2vec's idea, without its PCA and weighting)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding

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
