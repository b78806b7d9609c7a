"""Train a WikiCLIP-style dual encoder on the project's shards: frozen CLIP for the query
image, frozen text encoder + trainable Vision-Guided Knowledge Adaptor for the entity.

    python -m trainer.contrastive --train 'out/rew/samples-*.parquet' --entities wiki6m.jsonl \\
        --output out/contrastive [--clip_model ViT-L-14 --clip_pretrained openai] \\
        [--text_encoder meta-llama/Llama-3.2-1B] [--entity_images DIR] [--max_steps 1000] [--batch_size 128]

    torchrun --nproc_per_node 8 -m trainer.contrastive ...   # data parallel (NCCL on GPU, gloo on CPU)

The shards are read by trainer.train's streaming reader (Parquet, TFRecord or webdataset;
sharded over ranks and data-loader workers; corrupt records skipped and counted by
reason). Each record's `qid` is its entity; the entity's text is its catalog title and
`wikipedia_summary` (`--entities`: OVEN Wiki6M JSON lines, gzip or Parquet). Text token
embeddings are computed once per entity by the frozen encoder and kept in
`<output>/text_cache/` (reused on resume and by trainer.contrastive_predict with the same
encoder). Entity images (the adaptor's queries; WikiCLIP uses the Wikipedia lead image):
`--entity_images DIR` holding `<QID>.<jpg|png|webp>`; entities without one are read by
the adaptor's learned queries.

Batches: `--cluster_pool` batches' worth of records are embedded by CLIP and split into
batches of visually similar queries with distinct entities; each query gets
`--hard_negatives` synthetic entities (its entity image with another member's text) that
replace the negatives they beat (WikiCLIP's hard-negative synthesis). InfoNCE with a
learnable temperature; AdamW, linear warm-up then cosine. Checkpoints, resume, logging,
bf16 on GPU and the output layout (checkpoints/, train_log.jsonl, train_summary.json,
manifest.json and a card) are trainer.train's.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from trainer.checkpoints import OPTIMIZER_FILE, latest_checkpoint, publish_checkpoint, resume, staging_folder
from transforms.errors import UsageError
from transforms.run.cli import Parser

log = logging.getLogger("trainer.contrastive")

ADAPTOR_FILE = "adaptor.pt"
# Flags that change what a checkpoint means: a resumed run (and predict) must agree on them.
MODEL_FLAGS = ("clip_model", "clip_pretrained", "text_encoder", "max_text_tokens", "adaptor_layers", "adaptor_heads",
               "learned_queries")


def build_parser() -> Parser:
    p = Parser("trainer.contrastive", __doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="shards: a glob, folder or comma list (.parquet, .tfrecord, .tar)")
    p.add_argument("--entities", required=True, help="catalog with the entity texts: Wiki6M JSON lines (.gz) or Parquet")
    p.add_argument("--output", required=True, help="output folder (checkpoints, logs, text cache)")
    p.add_argument("--clip_model", default="ViT-B-32", help="open_clip architecture of the frozen query/entity image tower")
    p.add_argument("--clip_pretrained", default="none", help="open_clip weights tag (openai, ...); none = random weights (offline)")
    p.add_argument("--text_encoder", default="all-MiniLM-L6-v2",
                   help="frozen Hugging Face model for the entity text (a causal LM such as meta-llama/Llama-3.2-1B, or a sentence encoder)")
    p.add_argument("--max_text_tokens", type=int, default=64, help="entity text tokens kept (WikiCLIP: 256)")
    p.add_argument("--entity_images", default=None, help="folder of <QID>.<ext> entity images (e.g. Wikipedia lead images)")
    p.add_argument("--adaptor_layers", type=int, default=2, help="transformer decoder layers of the adaptor")
    p.add_argument("--adaptor_heads", type=int, default=8, help="attention heads of the adaptor")
    p.add_argument("--learned_queries", type=int, default=16, help="adaptor queries for entities without an image")
    p.add_argument("--hard_negatives", type=int, default=8, help="synthetic hard negatives per query (WikiCLIP's N_sync)")
    p.add_argument("--cluster_pool", type=int, default=8, help="batches pooled to form visually similar batches (1 = random batches)")
    p.add_argument("--temperature", type=float, default=0.07, help="initial InfoNCE temperature (learned)")
    p.add_argument("--max_steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=128, help="queries per batch per rank (WikiCLIP: 128)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (WikiCLIP: 1e-4, cosine)")
    p.add_argument("--warmup_steps", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine floor as a share of --lr")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--shuffle_buffer", type=int, default=2000, help="samples held per worker to shuffle the stream")
    p.add_argument("--num_workers", default="auto", help="data-loader workers per rank (auto: cores per rank - 1, at most 8)")
    p.add_argument("--crop", choices=("center", "inception"), default="center", help="query image crop")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the adaptor init, data order and batch grouping")
    p.add_argument("--log_every", type=int, default=10, help="steps between log lines")
    p.add_argument("--save_every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep_checkpoints", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in --output) | never | a checkpoint folder")
    return p


# --------------------------------------------------------------------------------------
# Entities: texts, token cache, images
# --------------------------------------------------------------------------------------


def entity_text(title: str, summary: Optional[str]) -> str:
    return f"{title}. {summary}" if summary else title


def read_catalog_texts(path: str) -> dict[str, str]:
    """qid -> entity text from a Wiki6M-style catalog (first occurrence of a QID wins).
    At 6M entities with summaries this dict is ~2-3 GB: one per training process."""
    from transforms.formats.files import match_files, open_read

    texts: dict[str, str] = {}
    for f in match_files(path, "--entities"):
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            with open_read(f) as fh:
                pf = pq.ParquetFile(fh)
                cols = [c for c in ("wikidata_id", "wikipedia_title", "wikipedia_summary") if c in pf.schema_arrow.names]
                if {"wikidata_id", "wikipedia_title"} - set(cols):
                    raise UsageError(f"--entities {f}: needs wikidata_id and wikipedia_title columns")
                for batch in pf.iter_batches(columns=cols, batch_size=65536):
                    d = batch.to_pydict()
                    for i, q in enumerate(d["wikidata_id"]):
                        if q and q not in texts and d["wikipedia_title"][i]:
                            texts[q] = entity_text(d["wikipedia_title"][i], (d.get("wikipedia_summary") or [None] * len(d["wikidata_id"]))[i])
            continue
        with open_read(f) as raw:
            head = raw.read(2)
            rest = raw.read()
        data = gzip.decompress(head + rest) if head == b"\x1f\x8b" else head + rest
        for line in io.StringIO(data.decode("utf-8", errors="replace")):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and isinstance(e.get("wikidata_id"), str) and isinstance(e.get("wikipedia_title"), str):
                summary = e.get("wikipedia_summary") if isinstance(e.get("wikipedia_summary"), str) else None
                texts.setdefault(e["wikidata_id"], entity_text(e["wikipedia_title"], summary))
    if not texts:
        raise UsageError(f"--entities {path!r}: no entity (wikidata_id, wikipedia_title) found")
    return texts


class TextCache:
    """Frozen-encoder token embeddings per entity, computed once and kept on disk:
    `tokens.f16` (rows of Dt float16, appended) and `index.jsonl` (qid, first row, rows).
    A cache belongs to one (encoder, max tokens); another one is an error, not a mix."""

    def __init__(self, folder: str, encoder, key: dict):
        self.folder = folder
        self.encoder = encoder
        self.dim = encoder.dim if encoder is not None else int(key["dim"])
        os.makedirs(folder, exist_ok=True)
        meta_path = os.path.join(folder, "cache.json")
        key = {**key, "dim": self.dim}
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved != key:
                raise UsageError(f"{folder} caches another text encoder ({saved}, not {key}): use another --output or remove it")
        else:
            with open(meta_path, "w", encoding="utf-8") as f:
                json.dump(key, f, sort_keys=True)
        self.index: dict[str, tuple[int, int]] = {}
        self.rows = 0
        idx = os.path.join(folder, "index.jsonl")
        data = os.path.join(folder, "tokens.f16")
        size_rows = os.path.getsize(data) // (2 * self.dim) if os.path.exists(data) else 0
        if os.path.exists(idx):
            with open(idx, encoding="utf-8") as f:
                for line in f:
                    try:
                        q, start, n = json.loads(line)
                    except ValueError:
                        break  # a line cut by a kill: everything after it is recomputed
                    if start + n <= size_rows:
                        self.index[q] = (start, n)
                        self.rows = max(self.rows, start + n)
        # Rows beyond the last indexed entity (a kill between the two appends) are dropped.
        if size_rows > self.rows:
            with open(data, "r+b") as f:
                f.truncate(self.rows * 2 * self.dim)
        self._data_path, self._idx_path = data, idx
        self._mm = None

    def _view(self) -> np.ndarray:
        if self._mm is None or self._mm.shape[0] < self.rows:
            self._mm = np.memmap(self._data_path, dtype=np.float16, mode="r", shape=(self.rows, self.dim)) if self.rows else None
        return self._mm

    def get(self, qids: Sequence[str], texts: dict[str, str], batch: int = 64) -> list[np.ndarray]:
        missing = [q for q in dict.fromkeys(qids) if q not in self.index]
        for i in range(0, len(missing), batch):
            part = missing[i : i + batch]
            arrays = self.encoder([texts[q] for q in part])
            with open(self._data_path, "ab") as f:
                for a in arrays:
                    f.write(np.ascontiguousarray(a, dtype=np.float16).tobytes())
            with open(self._idx_path, "a", encoding="utf-8") as f:
                for q, a in zip(part, arrays):
                    f.write(json.dumps([q, self.rows, len(a)]) + "\n")
                    self.index[q] = (self.rows, len(a))
                    self.rows += len(a)
        view = self._view()
        return [np.asarray(view[s : s + n], dtype=np.float32) for s, n in (self.index[q] for q in qids)]


class EntityImages:
    """`<QID>.<ext>` images in a folder -> CLIP-ready uint8 arrays (None: no image)."""

    def __init__(self, folder: Optional[str], size: int):
        from transforms.formats.media import IMAGE_SUFFIXES

        self.size = size
        self.paths: dict[str, str] = {}
        if folder:
            if not os.path.isdir(folder):
                raise UsageError(f"--entity_images {folder!r}: no such folder")
            for name in os.listdir(folder):
                stem, ext = os.path.splitext(name)
                if ext.lower().lstrip(".") in {s.lstrip(".") for s in IMAGE_SUFFIXES}:
                    self.paths[stem] = os.path.join(folder, name)

    def get(self, qid: str) -> Optional[np.ndarray]:
        path = self.paths.get(qid)
        if path is None:
            return None
        from trainer.data import image_to_uint8
        from transforms.io.images import ImageError

        try:
            with open(path, "rb") as f:
                return image_to_uint8(f.read(), self.size, "center", None)
        except (OSError, ImageError) as e:
            log.warning("entity image %s does not decode (%s): using the learned queries", path, e)
            return None


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class QueryItems:
    """A shard row -> {"pixels", "qid", "key"} in a data-loader worker (picklable)."""

    known: frozenset
    image_size: int
    crop: str = "center"

    def build(self, row: dict, rng) -> dict:
        from trainer.data import Skip, image_to_uint8
        from transforms.io.images import ImageError

        qid = row.get("qid") or ""
        if not qid:
            raise Skip("missing_qid")
        if qid not in self.known:
            raise Skip("qid_not_in_catalog", qid)
        try:
            pixels = image_to_uint8(row.get("image") or b"", self.image_size, self.crop, rng)
        except ImageError as e:
            raise Skip(f"image_{e.reason}", str(e)[:200]) from None
        return {"pixels": pixels, "qid": qid, "key": row.get("key")}


def collate_queries(items: list[dict]) -> dict:
    import torch

    skipped: Counter = Counter()
    for it in items:
        skipped.update(it.get("skipped") or {})
    return {"pixels": torch.from_numpy(np.stack([it["pixels"] for it in items])), "qids": [it["qid"] for it in items],
            "skipped": dict(skipped)}


# --------------------------------------------------------------------------------------
# Model state
# --------------------------------------------------------------------------------------


def save(output: str, step: int, adaptor, optimizer, state: dict, config: dict, keep: int) -> str:
    """Written to a temporary folder and renamed (trainer.checkpoints: trainer.train's layout and pointer)."""
    import torch

    tmp = staging_folder(output, step)
    torch.save(adaptor.state_dict(), os.path.join(tmp, ADAPTOR_FILE))
    torch.save({"optimizer": optimizer.state_dict()}, os.path.join(tmp, OPTIMIZER_FILE))
    return publish_checkpoint(output, step, config, state, keep)


def build_adaptor(config: dict, text_dim: int, dim: int):
    from trainer.contrastive_model import Adaptor

    return Adaptor(text_dim, dim, layers=int(config["adaptor_layers"]), heads=int(config["adaptor_heads"]),
                   learned_queries=int(config["learned_queries"]), temperature=float(config.get("temperature", 0.07)))


def entity_inputs(clip, cache: TextCache, images: EntityImages, qids: Sequence[str], texts: dict[str, str], device):
    """The adaptor's inputs for these entities: (text tokens, mask, patches or None, has_image)."""
    from trainer.contrastive_model import pad_tokens

    tokens, mask = pad_tokens(cache.get(qids, texts), device)
    patches, has = entity_patches(clip, images, qids, device)
    return tokens, mask, patches, has


def entity_patches(clip, images: EntityImages, qids: Sequence[str], device):
    """(patches (B, P, D) or None, has_image (B,) bool) of the entities' images."""
    import torch

    from trainer.data import normalize

    arrays = [images.get(q) for q in qids] if images.paths else [None] * len(qids)
    has = torch.tensor([a is not None for a in arrays], device=device)
    if not bool(has.any()):
        return None, has
    size = images.size
    stack = np.stack([a if a is not None else np.zeros((3, size, size), np.uint8) for a in arrays])
    _, patches = clip(normalize(torch.from_numpy(stack).to(device)))
    return patches, has


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(argv: Optional[Sequence[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    for flag in ("max_steps", "batch_size", "log_every", "save_every", "max_text_tokens", "adaptor_layers", "adaptor_heads",
                 "learned_queries", "cluster_pool"):
        if getattr(a, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    if a.hard_negatives < 0:
        raise UsageError("--hard_negatives must be >= 0")

    import torch
    from torch.utils.data import DataLoader

    from trainer import model as M
    from trainer.contrastive_model import (
        FrozenClip,
        FrozenText,
        cluster_batches,
        info_nce,
        synthetic_partners,
    )
    from trainer.data import ShardStream, list_units, normalize
    from trainer.train import (
        _device,
        _dist_setup,
        _gather_counts,
        _num_workers,
        _precision,
        _write_manifest,
        format_duration,
    )

    rank, world, local_rank, local_world = _dist_setup()
    device = _device(a, local_rank)
    amp_dtype, _ = _precision(a, device)
    if amp_dtype is torch.float16:
        amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    units = list_units(a.train)
    texts = read_catalog_texts(a.entities)
    config = {k: getattr(a, k) for k in vars(a)}
    resume_from, state = resume(a.output, a.resume, config, MODEL_FLAGS)

    clip = FrozenClip(a.clip_model, a.clip_pretrained, device)
    encoder = FrozenText(a.text_encoder, device, a.max_text_tokens)
    cache = TextCache(os.path.join(a.output, "text_cache", f"rank{rank}"), encoder,
                      {"text_encoder": a.text_encoder, "max_text_tokens": a.max_text_tokens})
    images = EntityImages(a.entity_images, clip.image_size)
    torch.manual_seed(a.seed)
    adaptor = build_adaptor(config, encoder.dim, clip.dim).to(device)
    if resume_from:
        adaptor.load_state_dict(torch.load(os.path.join(resume_from, ADAPTOR_FILE), map_location=device, weights_only=True))
    adaptor.train()
    n_params = sum(p.numel() for p in adaptor.parameters())
    net = adaptor
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # With entity images, a batch whose entities all have one leaves the learned queries unused.
        net = DistributedDataParallel(adaptor, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=bool(images.paths))
    decay = [p for n, p in adaptor.named_parameters() if p.ndim >= 2 and n != "queries"]
    rest = [p for n, p in adaptor.named_parameters() if not (p.ndim >= 2 and n != "queries")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                                  lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    if resume_from:
        optimizer.load_state_dict(torch.load(os.path.join(resume_from, OPTIMIZER_FILE), map_location=device, weights_only=True)["optimizer"])
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    stream = ShardStream(units, QueryItems(frozenset(texts), clip.image_size, a.crop), seed=a.seed, shuffle_buffer=a.shuffle_buffer,
                         rank=rank, world=world, start_step=state["step"])
    workers = _num_workers(a, local_world)
    loader = DataLoader(stream, batch_size=a.batch_size, num_workers=workers, collate_fn=collate_queries,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    if rank == 0:
        os.makedirs(a.output, exist_ok=True)
        log.info("WikiCLIP-style adaptor (%.2fM trainable parameters) over frozen %s (%s) and %s on %s x%d, %d shard units, "
                 "%d catalog entities, %d entity images%s", n_params / 1e6, a.clip_model, a.clip_pretrained, a.text_encoder,
                 device, world, len(units), len(texts), len(images.paths),
                 f", resuming at step {state['step']} from {resume_from}" if resume_from else "")

    skipped: Counter = Counter(state.get("skipped") or {}) if rank == 0 else Counter()
    step, samples = int(state["step"]), int(state["samples"])
    start_step, start_samples = step, samples
    rng = np.random.default_rng([a.seed, rank, step])
    batches = iter(loader)
    log_path = os.path.join(a.output, "train_log.jsonl")
    started, started_at = time.perf_counter(), dt.datetime.now(dt.UTC)
    window_t, window_n, window_loss, window_replaced = started, 0, [], []
    first_loss = last_loss = None
    queue: list = []
    while step < a.max_steps:
        if not queue:
            # A pool of batches -> CLIP once -> batches of visually similar queries.
            pool_px, pool_q = [], []
            for _ in range(a.cluster_pool):
                try:
                    b = next(batches)
                except StopIteration:
                    break
                skipped.update(b["skipped"])
                pool_px.append(b["pixels"])
                pool_q += b["qids"]
            if not pool_q:
                raise RuntimeError(f"rank {rank}: every data reader ended without a usable sample (skipped: {dict(skipped) or 'none'}); "
                                   "check --train and --entities")
            px = torch.cat(pool_px)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                h_all = torch.cat([clip(normalize(px[i : i + 256].to(device)))[0] for i in range(0, len(px), 256)])
            groups = cluster_batches(h_all.cpu().numpy(), pool_q, a.batch_size, rng) if a.cluster_pool > 1 else \
                [list(range(i, min(i + a.batch_size, len(pool_q)))) for i in range(0, len(pool_q), a.batch_size)]
            queue = [(h_all[g], [pool_q[i] for i in g]) for g in groups if len(g) > 1]
            if not queue:
                continue
        h, qids = queue.pop(0)
        factor = M.warmup_cosine(step, a.warmup_steps, a.max_steps, a.min_lr_ratio)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * factor
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            tokens, mask, patches, has = entity_inputs(clip, cache, images, qids, texts, device)
            n = len(qids)
            text_rows = torch.arange(n, device=device)
            image_rows = torch.arange(n, device=device)
            index = None
            if a.hard_negatives > 0 and len(set(qids)) > 1:
                # Query i's synthetic entities: its own entity image (or the learned queries)
                # with partner j's text; one adaptor pass for real and synthetic entities.
                index = torch.from_numpy(synthetic_partners(qids, a.hard_negatives, rng)).to(device)
                text_rows = torch.cat([text_rows, index.reshape(-1)])
                image_rows = torch.cat([image_rows, torch.arange(n, device=device).repeat_interleave(index.shape[1])])
            out = net(tokens[text_rows], mask[text_rows], None if patches is None else patches[image_rows],
                      None if patches is None else has[image_rows]).float()
            v = out[:n]
            synthetic = out[n:].reshape(n, index.shape[1], -1) if index is not None else None
            loss, replaced = info_nce(h.float(), v, adaptor.scale(), synthetic, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adaptor.parameters(), 1.0)
        optimizer.step()
        step += 1
        samples += len(qids) * world
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        last_loss = value
        window_n += len(qids) * world
        window_loss.append(value)
        window_replaced.append(float(replaced))
        if step % a.log_every == 0 or step == a.max_steps:
            now = time.perf_counter()
            record = {"step": step, "loss": round(float(np.mean(window_loss)), 5), "temperature": round(float(1 / adaptor.scale().detach()), 5),
                      "hard_negative_share": round(float(np.mean(window_replaced)), 4), "lr": optimizer.param_groups[0]["lr"],
                      "samples_per_s": round(window_n / max(now - window_t, 1e-9), 2), "samples": samples, "skipped": dict(skipped),
                      "eta_s": round((a.max_steps - step) * (now - started) / max(step - start_step, 1), 1)}
            if rank == 0:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("step %d/%d (%.0f%%) loss %.4f temperature %.4f hard negatives %.0f%% %.1f samples/s ETA %s%s",
                         step, a.max_steps, 100 * step / a.max_steps, record["loss"], record["temperature"],
                         100 * record["hard_negative_share"], record["samples_per_s"], format_duration(record["eta_s"]),
                         f" skipped {dict(skipped)}" if skipped else "")
            window_t, window_n, window_loss, window_replaced = now, 0, [], []
        if step % a.save_every == 0 or step == a.max_steps:
            total = _gather_counts(skipped, world) if world > 1 else skipped
            if rank == 0:
                state = {"step": step, "samples": samples, "skipped": dict(total), "loss": value, "resumed_from": state.get("resumed_from", []),
                         "elapsed_s": round(float(state.get("elapsed_s", 0.0)) + time.perf_counter() - started, 2),
                         "text_dim": encoder.dim, "dim": clip.dim}
                path = save(a.output, step, adaptor, optimizer, state, config, a.keep_checkpoints)
                log.info("checkpoint %s", path)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
    elapsed = time.perf_counter() - started
    total = _gather_counts(skipped, world)
    summary = {"steps": step, "samples": samples, "world_size": world, "batch_size_per_rank": a.batch_size,
               "first_loss": first_loss, "last_loss": last_loss, "skipped": dict(total), "skipped_total": sum(total.values()),
               "elapsed_s": round(elapsed, 2), "samples_per_s": round((samples - start_samples) / max(elapsed, 1e-9), 2),
               "checkpoint": latest_checkpoint(a.output), "parameters": n_params, "resumed_from": resume_from,
               "model": "wikiclip"}
    if rank == 0:
        with open(os.path.join(a.output, "train_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        _write_manifest(a, summary, started_at)
    del batches, loader
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    from transforms.run.cli import cli_main

    cli_main(run)
