"""Predict OVEN entities with a trainer.contrastive checkpoint: nearest entity embedding.

    python -m trainer.contrastive_predict --checkpoint out/contrastive --oven oven_entity_val.jsonl \\
        --images oven_images/ --output predictions.jsonl [--entities wiki6m.jsonl] [--entity_embeddings DIR] [--k 5]

1. Entity embeddings: every catalog entity (the `--entities` of training unless given) goes
   through the frozen text encoder and the trained adaptor once, in chunks of
   `--chunk` entities written as `part-NNNNN.npy` (+ their QIDs) to `--entity_embeddings`
   (default: `<checkpoint>/entity_embeddings/`); a chunk that exists is not recomputed, so a
   killed job resumes where it stopped, and later predictions reuse them. `--entity_images`
   as in training (entities without an image use the learned queries).
2. A faiss inner-product index over them (`--index_factory`: `Flat`, or `auto` = Flat below
   1M entities, else IVF(power of two >= 4 sqrt N),SQ8 searched with `--nprobe` 64: the
   entity-index study's choice at 6M), written beside the embeddings.
3. Each OVEN image -> frozen CLIP embedding -> top `--k` entities. Output lines are
   trainer.predict's format (`data_id`, `pred_entity_id`, `top_beam_entity_id`,
   `first_valid_entity_id`, `first_valid_rank`, `beams` = [{qid, score}]), so
   trainer.score reads them; a missing or broken image gets a line with `error`. The
   summary reports milliseconds per query image (decode, CLIP, search).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Optional

import numpy as np

from transforms.errors import UsageError
from transforms.run.cli import Parser

log = logging.getLogger("trainer.contrastive_predict")


def build_parser() -> Parser:
    p = Parser("trainer.contrastive_predict", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trainer.contrastive checkpoint folder or its --output")
    p.add_argument("--oven", required=True, help="OVEN annotation JSON lines (data_id, image_id, ...)")
    p.add_argument("--images", required=True, help="folder with IMAGE_ID.<ext>, flat or in sub-folders")
    p.add_argument("--output", required=True, help="predictions JSON lines")
    p.add_argument("--entities", default=None, help="catalog to predict over (default: the one the checkpoint was trained with)")
    p.add_argument("--entity_embeddings", default=None, help="folder of entity embeddings: read, or written there (default: <checkpoint>/entity_embeddings)")
    p.add_argument("--entity_images", default=None, help="folder of <QID>.<ext> entity images (default: the training one)")
    p.add_argument("--index_factory", default="auto", help="faiss index over the entity embeddings: auto | Flat | IVF4096,SQ8 | ...")
    p.add_argument("--nprobe", type=int, default=64, help="IVF cells searched")
    p.add_argument("--k", type=int, default=5, help="entities kept per image (beams)")
    p.add_argument("--chunk", type=int, default=65536, help="entities per embedding part file")
    p.add_argument("--batch_size", type=int, default=64, help="images / entities per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--limit", type=int, default=0, help="predict only the first N annotations (0 = all)")
    return p


def _load(checkpoint: str, device):
    import torch

    from trainer.checkpoints import read_config, read_state, resolve_checkpoint
    from trainer.contrastive import ADAPTOR_FILE, build_adaptor

    path = resolve_checkpoint(checkpoint)
    if not os.path.exists(os.path.join(path, ADAPTOR_FILE)):
        raise UsageError(f"--checkpoint {checkpoint!r}: no {ADAPTOR_FILE}; is it a trainer.contrastive checkpoint?")
    config, state = read_config(path), read_state(path)
    adaptor = build_adaptor(config, int(state["text_dim"]), int(state["dim"]))
    adaptor.load_state_dict(torch.load(os.path.join(path, ADAPTOR_FILE), map_location="cpu", weights_only=True))
    return path, config, adaptor.to(device).eval()


def embed_catalog(folder: str, qids: list[str], texts: dict[str, str], adaptor, clip, encoder, images, device,
                  chunk: int, batch: int) -> tuple[np.ndarray, list[str]]:
    """Every entity's embedding, chunk by chunk; finished chunks are read, not recomputed."""
    import torch

    from trainer.contrastive import entity_patches
    from trainer.contrastive_model import pad_tokens

    os.makedirs(folder, exist_ok=True)
    meta = {"entities": len(qids), "chunk": chunk, "first": qids[:1], "last": qids[-1:]}
    meta_path = os.path.join(folder, "embeddings.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            if json.load(f) != meta:
                raise UsageError(f"{folder} holds embeddings of another catalog or chunking: pass another --entity_embeddings")
    else:
        with open(meta_path, "w", encoding="utf-8") as f:
            json.dump(meta, f)
    parts, computed = [], 0
    for c, start in enumerate(range(0, len(qids), chunk)):
        path = os.path.join(folder, f"part-{c:05d}.npy")
        part_qids = qids[start : start + chunk]
        if os.path.exists(path):
            parts.append(np.load(path))
            continue
        out = []
        with torch.no_grad():
            for i in range(0, len(part_qids), batch):
                group = part_qids[i : i + batch]
                tokens, mask = pad_tokens(encoder([texts[q] for q in group]), device)
                patches, has = entity_patches(clip, images, group, device)
                out.append(adaptor(tokens, mask, patches, has).float().cpu().numpy())
        vectors = np.concatenate(out).astype(np.float32)
        tmp = path + ".tmp.npy"
        np.save(tmp, vectors)
        os.replace(tmp, path)  # a part exists only when complete
        parts.append(vectors)
        computed += len(part_qids)
    log.info("entity embeddings: %d computed, %d reused -> %s", computed, len(qids) - computed, folder)
    return np.concatenate(parts), qids


def build_index(vectors: np.ndarray, factory: str, nprobe: int):
    import faiss

    n, d = vectors.shape
    if factory == "auto":
        if n < 1_000_000:
            factory = "Flat"
        else:
            nlist = 1 << int(np.ceil(np.log2(4 * np.sqrt(n))))
            factory = f"IVF{nlist},SQ8"
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(n, size=min(n, max(100_000, 50 * getattr(index, "nlist", 1))), replace=False)]
        index.train(sample)
    index.add(vectors)
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    return index, factory


def run(argv: Optional[Sequence[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    if a.k < 1 or a.batch_size < 1 or a.chunk < 1:
        raise UsageError("--k, --batch_size and --chunk must be >= 1")
    import torch

    from trainer.contrastive import EntityImages, read_catalog_texts
    from trainer.contrastive_model import FrozenClip, FrozenText
    from trainer.data import center_crop, normalize
    from trainer.predict import index_images, load_query_image, read_oven, write_predictions

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    checkpoint, config, adaptor = _load(a.checkpoint, device)
    rows, bad = read_oven(a.oven, a.limit)
    images_index = index_images(a.images)
    clip = FrozenClip(config["clip_model"], config["clip_pretrained"], device)
    texts = read_catalog_texts(a.entities or config["entities"])
    qids = sorted(texts)
    folder = a.entity_embeddings or os.path.join(checkpoint, "entity_embeddings")
    started = time.perf_counter()
    have_all = os.path.exists(os.path.join(folder, "embeddings.json")) and all(
        os.path.exists(os.path.join(folder, f"part-{c:05d}.npy")) for c in range((len(qids) + a.chunk - 1) // a.chunk))
    encoder = None if have_all else FrozenText(config["text_encoder"], device, int(config["max_text_tokens"]))
    entity_images = EntityImages(a.entity_images or config.get("entity_images"), clip.image_size)
    vectors, qids = embed_catalog(folder, qids, texts, adaptor, clip, encoder, entity_images, device, a.chunk, a.batch_size)
    embed_s = time.perf_counter() - started
    index, factory = build_index(vectors, a.index_factory, a.nprobe)
    size = clip.image_size

    counts: Counter = Counter()
    lines: dict[int, dict] = {}
    query_s = 0.0
    batch: list[tuple[int, np.ndarray]] = []

    def flush():
        nonlocal query_s
        if not batch:
            return
        t0 = time.perf_counter()
        px = normalize(torch.from_numpy(np.stack([p for _, p in batch])).to(device))
        h, _ = clip(px)
        scores, ids = index.search(np.ascontiguousarray(h.cpu().numpy(), dtype=np.float32), a.k)
        query_s += time.perf_counter() - t0
        for (i, _), sc, idx in zip(batch, scores, ids):
            beams = [{"qid": qids[j], "score": round(float(s), 5)} for s, j in zip(sc, idx) if j >= 0]
            top = beams[0]["qid"] if beams else None
            lines[i] = {"data_id": rows[i]["data_id"], "pred_entity_id": top, "top_beam_entity_id": top,
                        "first_valid_entity_id": top, "first_valid_rank": 0 if top else None, "beams": beams}
            counts["predicted"] += 1
        batch.clear()

    for i, r in enumerate(rows):
        t0 = time.perf_counter()
        img, err = load_query_image(r, images_index, size)
        if err is not None:
            lines[i] = {**err, "top_beam_entity_id": None, "first_valid_entity_id": None, "first_valid_rank": None, "beams": []}
            counts[err["error"]] += 1
            continue
        batch.append((i, np.asarray(center_crop(img, size), dtype=np.uint8).transpose(2, 0, 1).copy()))
        query_s += time.perf_counter() - t0
        if len(batch) >= a.batch_size:
            flush()
    flush()
    write_predictions(a.output, [lines[i] for i in range(len(rows))], bad)
    predicted = counts["predicted"]
    summary = {
        "annotations": len(rows), "bad_annotation_lines": len(bad), "predicted": predicted,
        "errors": {k: v for k, v in counts.items() if k != "predicted"}, "entities": len(qids), "index_factory": factory,
        "entity_embeddings": folder, "entity_embedding_s": round(embed_s, 2),
        "ms_per_image": round(1000 * query_s / max(predicted, 1), 2), "checkpoint": checkpoint,
    }
    assert predicted + sum(summary["errors"].values()) == len(rows)
    log.info("predictions: %s -> %s", json.dumps(summary), a.output)
    return summary


if __name__ == "__main__":
    from transforms.run.cli import cli_main

    cli_main(run)
