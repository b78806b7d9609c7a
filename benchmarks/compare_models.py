"""The models our shards feed, side by side on the same shards and the same budget:
GIT with GER-ALD, hierarchical k-means (HKC) and IRGen residual-quantization (RQ) codes,
and the WikiCLIP-style contrastive model.

    .venv/bin/python benchmarks/compare_models.py [--demo demo_output] [--steps 300] [--batch_size 16]

Uses a finished demo run (`python -m pipelines.demo`; run first when --demo has none):
its REW shards for training, its entity index for HKC/RQ codes, its vocabulary, and its
OVEN-format evaluation file (25 "seen" training images and 10 images of entities never
trained on). Every model gets `--steps` optimizer steps of `--batch_size` samples, on the
same machine, one after another. Printed: OVEN scores (trainer.score), training samples/s,
and inference milliseconds per query image (trainer.predict / trainer.contrastive_predict:
image decoding, the model, decoding or search; the contrastive model's one-off catalog
embedding is reported apart).

What a CPU-sized run can show: that every path trains on the same shards, decodes only
valid entities and is scored by the same scorer; relative training and inference cost on
this machine (GIT's beam search vs one CLIP pass + a nearest-neighbour search). What it
cannot show: recognition quality. The demo's images are shapes drawn from a seed with
nothing of the entity in them, the image towers have random weights and the models are
tiny, so "unseen" is 0 for every model by construction and "seen" only says how well a
model memorised 25 images in a few hundred steps. Quality needs real images, real CLIP
weights and a GPU (WikiCLIP reports 28.5 unseen / 31.6 HM on OVEN entity val).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="demo_output", help="a finished pipelines.demo output folder (made when missing)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps for every model")
    ap.add_argument("--batch_size", type=int, default=16, help="samples per step for every model")
    ap.add_argument("--clip_model", default="ViT-S-32", help="open_clip tower of the contrastive model (random weights offline)")
    ap.add_argument("--output", default=None, help="work folder (default: <demo>/compare)")
    a = ap.parse_args(argv)

    from pipelines import build_codes, demo
    from trainer import contrastive, contrastive_predict, predict, score
    from trainer import train as trainer_train

    root = os.path.abspath(a.demo)
    if not os.path.exists(os.path.join(root, "metrics.json")):
        print(f"no finished demo in {root}: running python -m pipelines.demo --output {root} first", flush=True)
        _quiet(demo.main, ["--output", root])
    out = os.path.abspath(a.output or os.path.join(root, "compare"))
    os.makedirs(out, exist_ok=True)
    index, rew = os.path.join(root, "entity_index"), os.path.join(root, "rew", "samples-*.parquet")
    entities = os.path.join(root, "data", "entities.jsonl")
    vocab = os.path.join(root, "data", "wordpiece", "vocab.txt")
    oven = os.path.join(root, "data", "oven_eval", "oven_val.jsonl")
    images = os.path.join(root, "data", "oven_eval", "images")
    refs = [json.loads(line) for line in open(oven, encoding="utf-8")]
    rows = []

    for strategy in ("ald", "hkc", "rq"):
        codes = os.path.join(out, f"codes_{strategy}")
        made = _quiet(build_codes.run, ["--entity_index", index, "--tokenizer", vocab, "--strategy", strategy, "--output", codes])
        model = os.path.join(out, f"git_{strategy}")
        trained = trainer_train.run([
            "--train", rew, "--codes", codes, "--output", model, "--model_config", "tiny", "--max_steps", str(a.steps),
            "--batch_size", str(a.batch_size), "--lr", "3e-3", "--decoder_lr_multiplier", "1", "--warmup_steps", "10",
            "--crop", "center", "--log_every", "50", "--save_every", str(a.steps), "--resume", "never",
            "--task_weights", "entity=1,rationale=0.5,qa=0.5", "--shuffle_buffer", "64",
        ])
        preds = os.path.join(out, f"pred_{strategy}.jsonl")
        p = predict.run(["--checkpoint", model, "--oven", oven, "--images", images, "--output", preds])
        m = score.score(refs, [json.loads(line) for line in open(preds, encoding="utf-8")])
        rows.append({"model": f"GIT tiny + {strategy.upper()} codes", "metrics": m, "train_samples_per_s": trained["samples_per_s"],
                     "ms_per_image": p["ms_per_image"], "extra": f"codes unique {made['unique']}, random fallbacks "
                     f"{100 * (made['random_fallback_share'] or 0):.1f} %"})

    model = os.path.join(out, "wikiclip")
    trained = contrastive.run([
        "--train", rew, "--entities", entities, "--output", model, "--clip_model", a.clip_model, "--max_steps", str(a.steps),
        "--batch_size", str(a.batch_size), "--lr", "3e-3", "--warmup_steps", "10", "--log_every", "50",
        "--save_every", str(a.steps), "--resume", "never", "--shuffle_buffer", "64", "--hard_negatives", "4",
        "--cluster_pool", "4", "--max_text_tokens", "32",
    ])
    preds = os.path.join(out, "pred_wikiclip.jsonl")
    started = time.perf_counter()
    p = contrastive_predict.run(["--checkpoint", model, "--oven", oven, "--images", images, "--output", preds,
                                 "--entity_embeddings", os.path.join(out, "wikiclip_entities")])
    m = score.score(refs, [json.loads(line) for line in open(preds, encoding="utf-8")])
    rows.append({"model": f"WikiCLIP-style ({a.clip_model}, MiniLM)", "metrics": m, "train_samples_per_s": trained["samples_per_s"],
                 "ms_per_image": p["ms_per_image"],
                 "extra": f"catalog of {p['entities']} embedded once in {p['entity_embedding_s']:.1f} s "
                          f"(whole predict {time.perf_counter() - started:.1f} s)"})

    print(f"\nsame REW shards ({root}/rew), {a.steps} steps x {a.batch_size} samples each, this machine:")
    print(f"{'model':<34} {'seen':>6} {'unseen':>7} {'HM':>6} {'train samples/s':>16} {'ms/image':>9}  notes")
    for r in rows:
        m = r["metrics"]
        print(f"{r['model']:<34} {m['entity_seen']:>6.2f} {m['entity_unseen']:>7.2f} {m['entity']:>6.2f} "
              f"{r['train_samples_per_s']:>16.1f} {r['ms_per_image']:>9.1f}  {r['extra']}")
    print("(OVEN entity split; seen = the training images themselves, unseen = entities never trained on: 0 by construction here.)")
    with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
