"""Visual matching: GER's strong baseline and a dataset-quality probe.

    python -m trainer.visual_matching --memory 'out/rew/samples-*.parquet' --oven oven_entity_val.jsonl \\
        --images oven_images/ --output predictions.jsonl [--k 500] [--clip_model ViT-L-14 --clip_pretrained openai]

The curated images (our shards: Parquet, TFRecord or webdataset) are embedded with CLIP and
kept as a memory with their labels; each OVEN query image is classified by a majority vote
of its k nearest memory images (cosine, exact faiss search; ties go to the larger summed
similarity, then to the nearer neighbour). `--label_field candidate_qid` votes with the
labels caption retrieval proposed instead of the REW-corrected ones: the REW paper's way to
show that corrected labels are better (score both prediction files with trainer.score).

Memory embeddings are cached in `--memory_cache DIR` (vectors.npy, labels, keys) when
given, so a second probe with another k or label field costs only the queries. Images that
do not decode, rows without a label, and unreadable files are skipped and counted; a query
whose image is missing or broken gets a null prediction with an `error`, like
trainer.predict.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Optional

import numpy as np
from torch.utils.data import IterableDataset

from transforms.errors import UsageError
from transforms.run.cli import Parser

log = logging.getLogger("trainer.visual_matching")


def build_parser() -> argparse.ArgumentParser:
    p = Parser("trainer.visual_matching", __doc__.split("\n\n")[0])
    p.add_argument("--memory", required=True, help="curated shards: glob, folder or comma list")
    p.add_argument("--oven", required=True, help="OVEN annotation JSON lines")
    p.add_argument("--images", required=True, help="folder with IMAGE_ID.<ext>, flat or in sub-folders")
    p.add_argument("--output", required=True, help="predictions JSON lines")
    p.add_argument("--k", type=int, default=500, help="nearest memory images voting per query")
    p.add_argument("--label_field", choices=("qid", "candidate_qid"), default="qid", help="label of a memory image: the refined or the retrieved entity")
    p.add_argument("--clip_model", default="ViT-L-14", help="open_clip architecture")
    p.add_argument("--clip_pretrained", default="openai", help="tag, checkpoint path, or none (random weights)")
    p.add_argument("--batch_size", type=int, default=64, help="images per CLIP call")
    p.add_argument("--num_workers", type=int, default=-1, help="decoding processes (-1: cores - 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--memory_cache", default=None, help="folder to store / reuse the memory embeddings")
    return p


class MemoryImages(IterableDataset):
    """(key, label, pixels, skip counts) of every labelled memory image; shard units split
    over data-loader workers. Skips are counted by reason and ride along with the items."""

    def __init__(self, units, label_field, preprocess):
        self.units, self.label_field, self.preprocess = units, label_field, preprocess

    def __iter__(self):
        from torch.utils.data import get_worker_info

        from trainer.data import Skip, iter_unit
        from transforms.io.images import ImageError, decode_image

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        skipped: Counter = Counter()
        for unit in self.units[wid::nw]:
            for row in iter_unit(unit):
                if isinstance(row, Skip):
                    skipped[row.reason] += 1
                    continue
                label = row.get(self.label_field)
                if not label:
                    skipped[f"no_{self.label_field}"] += 1
                    continue
                try:
                    img = decode_image(row.get("image") or b"").image
                except ImageError as e:
                    skipped[f"image_{e.reason}"] += 1
                    continue
                yield row.get("key") or "", label, self.preprocess(img), dict(skipped)
                skipped.clear()
        if skipped:
            yield None, None, None, dict(skipped)


def _collate(items):
    import torch

    kept = [it for it in items if it[0] is not None]
    skipped: Counter = Counter()
    for it in items:
        skipped.update(it[3])
    pixels = torch.stack([it[2] for it in kept]) if kept else None
    return [it[0] for it in kept], [it[1] for it in kept], pixels, skipped


def embed_memory(a, model, preprocess, device) -> tuple[np.ndarray, list[str], list[str], Counter]:
    import torch
    from torch.utils.data import DataLoader

    from trainer.data import list_units

    units = list_units(a.memory, "--memory")
    workers = a.num_workers if a.num_workers >= 0 else max(0, (os.cpu_count() or 1) - 1)
    loader = DataLoader(
        MemoryImages(units, a.label_field, preprocess), batch_size=a.batch_size, num_workers=min(workers, len(units)),
        collate_fn=_collate,
    )
    vectors, keys, labels, skipped = [], [], [], Counter()
    with torch.no_grad():
        for k, lab, pixels, sk in loader:
            skipped.update(sk)
            if pixels is None:
                continue
            feats = torch.nn.functional.normalize(model.encode_image(pixels.to(device)).float(), dim=-1)
            vectors.append(feats.cpu().numpy())
            keys += k
            labels += lab
    if not vectors:
        raise UsageError(f"--memory {a.memory!r}: no labelled image could be embedded (skipped: {dict(skipped)})")
    return np.concatenate(vectors).astype(np.float32), keys, labels, skipped


def vote(neighbors: np.ndarray, sims: np.ndarray, labels: Sequence[str], top: int = 5) -> list[tuple[str, int, float]]:
    """Majority vote over one query's neighbours: [(label, votes, summed similarity)] best
    first; ties by summed similarity, then by the rank of the label's nearest neighbour."""
    votes: dict[str, list] = {}
    for rank, (n, s) in enumerate(zip(neighbors.tolist(), sims.tolist())):
        if n < 0:
            continue
        v = votes.setdefault(labels[n], [0, 0.0, rank])
        v[0] += 1
        v[1] += s
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[1][2]))
    return [(lab, v[0], round(v[1], 5)) for lab, v in ranked[:top]]


def run(argv: Optional[Sequence[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    if a.k < 1 or a.batch_size < 1:
        raise UsageError("--k and --batch_size must be >= 1")
    from trainer.predict import index_images, load_query_image, read_oven, write_predictions
    from transforms.models.clip import load_open_clip, validate_clip_args

    rows, bad = read_oven(a.oven)
    images = index_images(a.images)
    validate_clip_args(a.clip_model, a.clip_pretrained)
    import faiss
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    model, preprocess = load_open_clip(a.clip_model, a.clip_pretrained, device)
    started = time.perf_counter()
    cache = a.memory_cache
    meta_path = os.path.join(cache, "memory.json") if cache else None
    fingerprint = {"memory": a.memory, "clip_model": a.clip_model, "clip_pretrained": a.clip_pretrained, "label_field": a.label_field}
    if cache and os.path.exists(meta_path) and json.load(open(meta_path, encoding="utf-8")).get("fingerprint") == fingerprint:
        meta = json.load(open(meta_path, encoding="utf-8"))
        vectors = np.load(os.path.join(cache, "vectors.npy"))
        keys, labels, skipped = meta["keys"], meta["labels"], Counter(meta["skipped"])
        log.info("memory embeddings from %s", cache)
    else:
        vectors, keys, labels, skipped = embed_memory(a, model, preprocess, device)
        if cache:
            os.makedirs(cache, exist_ok=True)
            np.save(os.path.join(cache, "vectors.npy"), vectors)
            with open(meta_path, "w", encoding="utf-8") as f:
                json.dump({"fingerprint": fingerprint, "keys": keys, "labels": labels, "skipped": dict(skipped)}, f)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    k = min(a.k, len(labels))

    out_lines: dict[int, dict] = {}
    errors: Counter = Counter()
    todo: list[tuple[int, object]] = []

    def flush():
        if not todo:
            return
        with torch.no_grad():
            q = torch.stack([px for _, px in todo]).to(device)
            feats = torch.nn.functional.normalize(model.encode_image(q).float(), dim=-1).cpu().numpy().astype(np.float32)
        sims, nbrs = index.search(feats, k)
        for (i, _), nb, sm in zip(todo, nbrs, sims):
            ranked = vote(nb, sm, labels)
            out_lines[i] = {
                "data_id": rows[i]["data_id"],
                "pred_entity_id": ranked[0][0] if ranked else None,
                "votes": [{"qid": lab, "votes": n, "similarity_sum": s} for lab, n, s in ranked],
                "nearest_key": keys[int(nb[0])] if len(nb) and nb[0] >= 0 else None,
            }
        todo.clear()

    for i, r in enumerate(rows):
        img, err = load_query_image(r, images)
        if err is not None:
            errors[err["error"]] += 1
            out_lines[i] = err
            continue
        todo.append((i, preprocess(img)))
        if len(todo) >= a.batch_size:
            flush()
    flush()
    write_predictions(a.output, [out_lines[i] for i in range(len(rows))], bad)
    summary = {
        "memory_images": len(labels),
        "memory_entities": len(set(labels)),
        "memory_skipped": dict(skipped),
        "k": k,
        "label_field": a.label_field,
        "annotations": len(rows),
        "bad_annotation_lines": len(bad),
        "predicted": len(rows) - sum(errors.values()),
        "errors": dict(errors),
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    log.info("visual matching: %s -> %s", json.dumps(summary), a.output)
    return summary


if __name__ == "__main__":
    from transforms.run.cli import cli_main

    cli_main(run)
