"""Train a GIT entity-recognition model (GER-ALD codes, REW multi-task) on the project's shards.

    python -m trainer.train --train 'out/rew/samples-*.parquet' --codes out/codes --output out/model \\
        [--model_config tiny|base|large] [--init microsoft/git-large] [--max_steps 1000] [--batch_size 32]
        [--task_weights entity=1,rationale=0.5,qa=0.5] [--entity_target code|name] [--stage pretrain|finetune]

    torchrun --nproc_per_node 8 -m trainer.train ...        # data parallel (NCCL on GPU, gloo on CPU)

Shards: Parquet, TFRecord or webdataset, as written by decontaminate or refine (see
trainer/data.py for sharding across ranks and data-loader workers, and for what is skipped
and counted). Stages: `pretrain` asks one of GER's six generic questions, `finetune` the
OVEN question (the record's own `question` when it has one) and uses the paper's fine-tune
defaults (LR 3e-7, label smoothing 0.1) instead of the pre-training ones (LR 1e-5, 0.3).
The decoder (text side) learns `--decoder_lr_multiplier` times faster than the image
encoder; LR warms up linearly, then follows a cosine. On GPU, bf16 autocast (fp16 with loss
scaling where bf16 is missing).

Output: checkpoints/step-NNNNNNN/ (model + config, tokenizer.json, codes.parquet,
train_config.json, train_state.json, optimizer.pt) with checkpoints/latest naming the
newest; train_log.jsonl (one line per --log_every steps); train_summary.json. A run whose
--output already holds checkpoints resumes from the newest (--resume auto), continuing the
step count, the optimizer state and the LR schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Optional

from trainer.checkpoints import (  # noqa: F401  (re-exported: tests and tools import them from here)
    CHECKPOINTS,
    CONFIG_FILE,
    LATEST,
    OPTIMIZER_FILE,
    STATE_FILE,
    latest_checkpoint,
    publish_checkpoint,
    resolve_checkpoint,
    resume,
    staging_folder,
)
from transforms.errors import UsageError
from transforms.run.cli import Parser, format_duration

log = logging.getLogger("trainer.train")

STAGE_DEFAULTS = {
    # GER's published hyper-parameters (the GER paper's implementation details).
    "pretrain": {"lr": 1e-5, "label_smoothing": 0.3, "warmup_steps": 250},
    "finetune": {"lr": 3e-7, "label_smoothing": 0.1, "warmup_steps": 250},
}
# Flags that change what a checkpoint means: a resumed run must agree on them.
MODEL_FLAGS = ("model_config", "init", "entity_target")


def build_parser() -> argparse.ArgumentParser:
    p = Parser("trainer.train", __doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="shards: a glob, folder or comma list (.parquet, .tfrecord, .tar)")
    p.add_argument("--codes", required=True, help="output folder of pipelines.build_codes (codes.parquet, tokenizer.json)")
    p.add_argument("--output", required=True, help="local (or mounted) folder for checkpoints and logs")
    p.add_argument("--model_config", choices=("tiny", "base", "large"), default="large", help="GIT size (tiny: tests and demo)")
    p.add_argument("--init", default=None, help="pre-trained GIT: a Hugging Face id (microsoft/git-large) or a folder")
    p.add_argument("--entity_target", choices=("code", "name"), default="code", help="decode GER-ALD codes or entity names")
    p.add_argument("--task_weights", default="entity=1,rationale=0.5,qa=0.5", help="TASK=WEIGHT,... over entity, rationale, qa")
    p.add_argument("--stage", choices=("pretrain", "finetune"), default="pretrain", help="pretrain on curated shards, finetune on OVEN")
    p.add_argument("--question", default=None, help="question of the entity task in finetune (default: OVEN's)")
    p.add_argument("--max_steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=32, help="per rank, per micro-step")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="image-encoder LR (default by --stage)")
    p.add_argument("--decoder_lr_multiplier", type=float, default=10.0, help="text decoder LR = --lr x this")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup_steps", type=int, default=None, help="linear warm-up steps (default by --stage)")
    p.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine floor as a fraction of the peak LR")
    p.add_argument("--label_smoothing", type=float, default=None, help="cross-entropy label smoothing (default by --stage)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="auto: bf16 on a GPU that has it, else fp32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--num_workers", default="auto", help="data-loader worker processes per rank")
    p.add_argument("--shuffle_buffer", type=int, default=2000, help="samples held per worker to shuffle the stream")
    p.add_argument("--crop", choices=("inception", "center"), default="inception", help="training crop of the image")
    p.add_argument("--crop_min_scale", type=float, default=0.08, help="smallest area share of an inception crop")
    p.add_argument("--max_text_tokens", type=int, default=64, help="target tokens kept per sample")
    p.add_argument("--save_every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--keep_checkpoints", type=int, default=3, help="newest checkpoints kept")
    p.add_argument("--log_every", type=int, default=10, help="steps between log lines")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in --output) | never | a checkpoint folder")
    p.add_argument("--seed", type=int, default=0, help="seed of weights init, data order and crops")
    return p


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def save_checkpoint(output: str, step: int, model, optimizer, scaler, state: dict, config: dict, codes_dir: str, keep: int) -> str:
    """Written to a temporary folder and renamed (trainer.checkpoints), so a kill mid-save
    leaves the previous checkpoint as the newest."""
    import torch

    tmp = staging_folder(output, step)
    model.save_pretrained(tmp)
    from transforms.formats.files import read_bytes

    for f in ("tokenizer.json", "codes.parquet"):  # --codes may be gs://
        with open(os.path.join(tmp, f), "wb") as out:
            out.write(read_bytes(f"{codes_dir.rstrip('/')}/{f}"))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None}, os.path.join(tmp, OPTIMIZER_FILE))
    return publish_checkpoint(output, step, config, state, keep)


# --------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------


def _resolve_defaults(a) -> None:
    d = STAGE_DEFAULTS[a.stage]
    for k in ("lr", "label_smoothing", "warmup_steps"):
        if getattr(a, k) is None:
            setattr(a, k, d[k])
    if a.question is None:
        from trainer.data import OVEN_QUESTION

        a.question = OVEN_QUESTION


def validate(a) -> None:
    from transforms.run.cli import positive

    positive("--max_steps", a.max_steps)
    positive("--batch_size", a.batch_size)
    positive("--grad_accum", a.grad_accum)
    positive("--log_every", a.log_every)
    positive("--save_every", a.save_every)
    positive("--max_text_tokens", a.max_text_tokens, minimum=4)
    if a.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {a.lr}")
    if not 0 <= a.label_smoothing < 1:
        raise UsageError(f"--label_smoothing must be in [0, 1), got {a.label_smoothing}")
    if not 0 < a.crop_min_scale <= 1:
        raise UsageError(f"--crop_min_scale must be in (0, 1], got {a.crop_min_scale}")
    if a.output.startswith("gs://"):
        raise UsageError("--output must be a local or mounted folder (checkpoints are renamed atomically); mount the bucket")
    if not os.path.isdir(a.codes) and not a.codes.startswith("gs://"):
        raise UsageError(f"--codes {a.codes!r}: no such folder; build it with python -m pipelines.build_codes")
    if a.num_workers != "auto":
        try:
            if int(a.num_workers) < 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"--num_workers must be auto or an integer >= 0, got {a.num_workers!r}") from None


def _num_workers(a, local_world: int) -> int:
    if a.num_workers != "auto":
        return int(a.num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, local_world) - 1))


def _device(a, local_rank: int):
    import torch

    if a.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    if a.device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(a.device)


def _precision(a, device) -> tuple[Optional[object], bool]:
    """(autocast dtype or None, use a GradScaler)."""
    import torch

    p = a.precision
    if p == "auto":
        if device.type != "cuda":
            return None, False
        p = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if p == "fp32":
        return None, False
    if p == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise UsageError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return torch.float16, True


def _dist_setup():
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world > 1 and not dist.is_initialized():
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return rank, world, local_rank, local_world


def _gather_counts(counts: Counter, world: int) -> Counter:
    if world == 1:
        return counts
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, dict(counts))
    total: Counter = Counter()
    for p in parts:
        total.update(p or {})
    return total


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(argv: Optional[Sequence[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    _resolve_defaults(a)
    validate(a)

    import torch
    from torch.utils.data import DataLoader

    from trainer import model as M
    from trainer.codebook import CodeBook, bos_id, eos_id, load_tokenizer, pad_id
    from trainer.data import (
        TASKS,
        ItemBuilder,
        ShardStream,
        collate,
        list_units,
        normalize,
        parse_task_weights,
    )

    weights = parse_task_weights(a.task_weights)
    rank, world, local_rank, local_world = _dist_setup()
    device = _device(a, local_rank)
    amp_dtype, use_scaler = _precision(a, device)
    units = list_units(a.train)
    codebook = CodeBook.load(a.codes)
    tok = load_tokenizer(a.codes)
    vocab = tok.get_vocab_size()

    config = {k: getattr(a, k) for k in vars(a)}
    resume_from, state = resume(a.output, a.resume, config, MODEL_FLAGS)
    if resume_from:
        if state["step"] >= a.max_steps:
            log.info("checkpoint %s is already at step %d >= --max_steps %d", resume_from, state["step"], a.max_steps)
        from transformers import GitForCausalLM

        model = GitForCausalLM.from_pretrained(resume_from)
    else:
        try:
            model = M.build_model(a.model_config, a.init, vocab, pad_id(tok), bos_id(tok), eos_id(tok), seed=a.seed)
        except ValueError as e:
            raise UsageError(str(e)) from e
        except OSError as e:
            raise UsageError(f"--init {a.init!r} could not be loaded ({e}); offline, give a local folder") from e
    model.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    net = M.TargetLogits(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    groups = M.param_groups(model, a.lr, a.decoder_lr_multiplier, a.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    if resume_from:
        saved_opt = torch.load(os.path.join(resume_from, OPTIMIZER_FILE), map_location=device, weights_only=True)
        optimizer.load_state_dict(saved_opt["optimizer"])
        if scaler is not None and saved_opt.get("scaler"):
            scaler.load_state_dict(saved_opt["scaler"])

    builder = ItemBuilder(
        tokenizer_json=tok.to_str(),
        codebook=codebook,
        image_size=M.image_size(model),
        task_weights=weights,
        entity_target=a.entity_target,
        stage=a.stage,
        question=a.question,
        crop=a.crop,
        crop_min_scale=a.crop_min_scale,
        max_text_tokens=a.max_text_tokens,
    )
    stream = ShardStream(units, builder, seed=a.seed, shuffle_buffer=a.shuffle_buffer, rank=rank, world=world, start_step=state["step"])
    workers = _num_workers(a, local_world)
    loader = DataLoader(
        stream,
        batch_size=a.batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    if rank == 0:
        os.makedirs(a.output, exist_ok=True)
        log.info(
            "GIT %s (%.1fM parameters, %d image tokens, %d px) on %s x%d, %d shard units, %d entities with codes, "
            "workers/rank %d, precision %s%s",
            a.init or a.model_config, n_params / 1e6, M.image_tokens(model), M.image_size(model), device, world,
            len(units), len(codebook), workers, amp_dtype or "fp32",
            f", resuming at step {state['step']} from {resume_from}" if resume_from else "",
        )

    # Counts saved in a checkpoint are job totals: carried by rank 0 only.
    skipped: Counter = Counter(state.get("skipped") or {}) if rank == 0 else Counter()
    step, samples = int(state["step"]), int(state["samples"])
    start_samples, start_step = samples, step
    task_loss: dict[int, list[float]] = defaultdict(list)
    log_path = os.path.join(a.output, "train_log.jsonl")
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC)
    window_t, window_samples, data_wait = started, 0, 0.0
    first_loss = last_loss = None
    batches = iter(loader)
    while step < a.max_steps:
        factor = M.warmup_cosine(step, a.warmup_steps, a.max_steps, a.min_lr_ratio)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * factor
        step_loss = 0.0
        for micro in range(a.grad_accum):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"rank {rank}: every data reader ended without a usable sample (skipped so far: {dict(skipped) or 'none'}); "
                    "check --train and --codes, or use fewer --num_workers / ranks than there are records"
                ) from None
            data_wait += time.perf_counter() - t0
            skipped.update(batch["skipped"])
            pixels = normalize(batch["pixels"].to(device, non_blocking=True))
            args = [batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "label_rows", "label_cols")]
            sync = world == 1 or micro == a.grad_accum - 1
            ctx = net.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = net(pixels, *args)
                loss, per_sample = M.target_loss(
                    logits, batch["labels"].to(device), args[2], len(batch["tasks"]), a.label_smoothing
                )
                scaled = loss / a.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += float(loss.detach()) / a.grad_accum
            for t, v in zip(batch["tasks"].tolist(), per_sample.tolist()):
                task_loss[t].append(v)
            window_samples += len(batch["tasks"]) * world
        if scaler:
            scaler.unscale_(optimizer)
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples += a.batch_size * a.grad_accum * world
        first_loss = step_loss if first_loss is None else first_loss
        last_loss = step_loss
        if step % a.log_every == 0 or step == a.max_steps:
            now = time.perf_counter()
            record = {
                "step": step,
                "loss": round(step_loss, 5),
                "task_loss": {TASKS[t]: round(sum(v) / len(v), 5) for t, v in sorted(task_loss.items())},
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": round(window_samples / max(now - window_t, 1e-9), 2),
                "data_wait_share": round(data_wait / max(now - window_t, 1e-9), 3),
                "samples": samples,
                "skipped": dict(skipped),
                # Time left at the mean pace of this run so far.
                "eta_s": round((a.max_steps - step) * (now - started) / max(step - start_step, 1), 1),
            }
            if rank == 0:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                log.info(
                    "step %d/%d (%.0f%%) loss %.4f %s lr %.2e %.1f samples/s (data wait %.0f%%) ETA %s%s",
                    step, a.max_steps, 100 * step / a.max_steps, step_loss, record["task_loss"], record["lr"],
                    record["samples_per_s"], 100 * record["data_wait_share"], format_duration(record["eta_s"]),
                    f" skipped {dict(skipped)}" if skipped else "",
                )
            task_loss.clear()
            window_t, window_samples, data_wait = now, 0, 0.0
        if step % a.save_every == 0 or step == a.max_steps:
            total_skipped = _gather_counts(skipped, world) if world > 1 else skipped
            if rank == 0:
                state = {
                    "step": step,
                    "samples": samples,
                    "skipped": dict(total_skipped if world > 1 else skipped),
                    "elapsed_s": round(float(state.get("elapsed_s", 0.0)) + time.perf_counter() - started, 2),
                    "resumed_from": state.get("resumed_from", []),
                    "loss": step_loss,
                }
                path = save_checkpoint(a.output, step, model, optimizer, scaler, state, config, a.codes, a.keep_checkpoints)
                log.info("checkpoint %s", path)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
    elapsed = time.perf_counter() - started
    total_skipped = _gather_counts(skipped, world)
    summary = {
        "steps": step,
        "samples": samples,
        "world_size": world,
        "batch_size_per_rank": a.batch_size,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "skipped": dict(total_skipped),
        "skipped_total": sum(total_skipped.values()),
        "elapsed_s": round(elapsed, 2),
        "samples_per_s": round((samples - start_samples) / max(elapsed, 1e-9), 2),
        "checkpoint": latest_checkpoint(a.output),
        "parameters": n_params,
        "resumed_from": resume_from,
    }
    if rank == 0:
        with open(os.path.join(a.output, "train_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        _write_manifest(a, summary, started_at)
        log.info("done: %d steps, %d samples, skipped %s -> %s", step, samples, dict(total_skipped) or 0, summary["checkpoint"])
    del batches, loader
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def _write_manifest(a, summary: dict, started_at) -> None:
    """`<output>/manifest.json` (kind "model": the run's options, inputs and summary, like
    every pipeline output) and its card (README.md with the loss curve)."""
    from transforms.report.card import write_card_safely
    from transforms.run.lineage import stamp
    from transforms.run.secrets import redact_value
    from transforms.run.version import code_version

    manifest = {
        "kind": "model",
        **summary,
        "options": redact_value({k: v for k, v in sorted(vars(a).items()) if not k.startswith("_")}),
        "inputs": {k: getattr(a, k) for k in ("train", "codes", "entities", "entity_images") if getattr(a, k, None)},
        "code_version": code_version(),
        "created": started_at.isoformat(timespec="seconds"),
        "seconds": summary["elapsed_s"],
        "count_check": "ok" if not summary["skipped_total"] else f"{summary['skipped_total']} samples skipped (see skipped)",
    }
    stamp(manifest, manifest["options"], a.output)
    with open(os.path.join(a.output, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
    write_card_safely(a.output, manifest)


if __name__ == "__main__":
    from transforms.run.cli import cli_main

    cli_main(run)
