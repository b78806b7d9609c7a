"""trainer.train vs a bare PyTorch loop over pre-decoded in-memory tensors: does the data
path (shard reading, JPEG decoding, cropping, tokenising, collation in data-loader
workers) keep the model fed?

    .venv/bin/python benchmarks/train_bench.py [--samples 1024] [--model_config base] [--steps 24] [--batch_size 8]

Both sides use the same GIT model shape and seed, batch, optimizer, loss (target-position
logits, label smoothing) and threads. The bare side builds every batch up front with the
trainer's own ItemBuilder and collate (decoding not timed), then times forward + backward
+ AdamW steps. Our side is `trainer.train.run` reading JPEG images from Parquet shards
written by the pipelines' shard writer, with its default number of loader workers.
Reported: steady-state samples/s (our side: from train_log.jsonl windows after the first;
bare: after 2 warm-up steps) and the ratio; and whole-run samples/s including start-up.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def make_data(root: str, n: int, image_px: int, seed: int = 0) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from PIL import Image, ImageDraw
    from tokenizers import BertWordPieceTokenizer

    from pipelines import build_codes
    from pipelines.demo_data.make_corpus import load_catalog
    from transforms.io.writers import WriteShards
    from transforms.schema import Sample

    catalog = load_catalog()
    entities = [(e["wikidata_id"], e["wikipedia_title"]) for e in catalog]
    tok = BertWordPieceTokenizer(lowercase=True)
    texts = [t.lower() for _, t in entities] + ["what is the main object? what is shown in the photo? a photo of"] * 5
    tok.train_from_iterator(texts, vocab_size=2000, min_frequency=1)
    tok.save_model(root)
    with open(os.path.join(root, "entities.jsonl"), "w", encoding="utf-8") as f:
        for e in catalog:
            f.write(json.dumps(e) + "\n")
    build_codes.run(["--entities", os.path.join(root, "entities.jsonl"), "--tokenizer", os.path.join(root, "vocab.txt"),
                     "--output", os.path.join(root, "codes")])
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        qid, title = entities[i % len(entities)]
        img = Image.new("RGB", (image_px, image_px), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.randrange(image_px), rng.randrange(image_px)
            d.ellipse([x, y, x + rng.randrange(10, 80), y + rng.randrange(10, 80)], fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        samples.append(Sample(key=f"{i:08d}", image=buf.getvalue(), image_format="jpg", qid=qid, title=title))
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as p:
        _ = p | beam.Create(samples) | WriteShards(os.path.join(root, "shards"), "samples", ["parquet"], num_shards=4)
    return {"codes": os.path.join(root, "codes"), "shards": os.path.join(root, "shards", "samples-*.parquet")}


def bare_loop(data: dict, a) -> tuple[float, float]:
    """(steady samples/s, whole samples/s incl. model build) of the bare loop."""
    import torch

    from trainer import model as M
    from trainer.codebook import CodeBook, bos_id, eos_id, load_tokenizer, pad_id
    from trainer.data import ItemBuilder, collate, iter_unit, list_units, normalize

    t_start = time.perf_counter()
    tok = load_tokenizer(data["codes"])
    model = M.build_model(a.model_config, None, tok.get_vocab_size(), pad_id(tok), bos_id(tok), eos_id(tok), seed=0)
    model.train()
    builder = ItemBuilder(tok.to_str(), CodeBook.load(data["codes"]), M.image_size(model), {"entity": 1.0}, crop="inception")
    rng = random.Random(0)
    items = [builder.build(r, rng) for u in list_units(data["shards"]) for r in iter_unit(u)]
    batches = [collate(items[i : i + a.batch_size]) for i in range(0, len(items) - a.batch_size + 1, a.batch_size)]
    batches = [{**b, "pixels": normalize(b["pixels"])} for b in batches]  # decoded and normalised up front
    net = M.TargetLogits(model)
    opt = torch.optim.AdamW(M.param_groups(model, 1e-4, 10.0, 0.01), lr=1e-4)
    t_build = time.perf_counter() - t_start
    times = []
    for step in range(a.steps):
        b = batches[step % len(batches)]
        t0 = time.perf_counter()
        logits = net(b["pixels"], b["input_ids"], b["attention_mask"], b["label_rows"], b["label_cols"])
        loss, _ = M.target_loss(logits, b["labels"], b["label_rows"], len(b["tasks"]), 0.3)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    steady = a.batch_size * (a.steps - 2) / sum(times[2:])
    whole = a.batch_size * a.steps / (t_build + sum(times))
    return steady, whole


def ours(data: dict, a, out: str) -> tuple[float, float]:
    from trainer import train

    t0 = time.perf_counter()
    train.run([
        "--train", data["shards"], "--codes", data["codes"], "--output", out, "--model_config", a.model_config,
        "--max_steps", str(a.steps), "--batch_size", str(a.batch_size), "--lr", "1e-4", "--task_weights", "entity=1",
        "--log_every", str(a.log_every), "--save_every", str(10 * a.steps), "--resume", "never",
    ])
    whole = a.batch_size * a.steps / (time.perf_counter() - t0)
    with open(os.path.join(out, "train_log.jsonl"), encoding="utf-8") as f:
        windows = [json.loads(line) for line in f][1:]  # the first window holds worker start-up
    steady = sum(w["samples_per_s"] for w in windows) / len(windows)
    wait = sum(w["data_wait_share"] for w in windows) / len(windows)
    print(f"  (our data wait share in steady state: {wait:.1%})")
    return steady, whole


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--image_px", type=int, default=320)
    ap.add_argument("--model_config", default="base")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--log_every", type=int, default=4)
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as root:
        data = make_data(root, a.samples, a.image_px)
        # Ours first, so the bare side does not start with a warmer allocator.
        ours_steady, ours_whole = ours(data, a, os.path.join(root, "run"))
        bare_steady, bare_whole = bare_loop(data, a)
    print(f"GIT {a.model_config}, batch {a.batch_size}, {a.steps} steps, {a.samples} JPEG samples ({a.image_px} px) in Parquet")
    print("steady state:")
    print(f"  bare loop, pre-decoded tensors  {bare_steady:8.2f} samples/s")
    print(f"  trainer.train from shards       {ours_steady:8.2f} samples/s")
    print(f"  ratio trainer / bare            {ours_steady / bare_steady:8.3f}")
    print("whole run (model build, data start-up included; bare: decoding not timed):")
    print(f"  bare {bare_whole:.2f} samples/s, trainer.train {ours_whole:.2f} samples/s, ratio {ours_whole / bare_whole:.3f}")


if __name__ == "__main__":
    main()
