"""select_candidates (DirectRunner) vs a bare script doing the same compute, on the same data.

    python benchmarks/select_bench.py [--captions 20000] [--k 10] [--out /tmp/select_bench]

Both sides embed the same captions with the same sentence-transformer and thread count,
search the same flat faiss entity index for the top-M entities, and keep the top-K distinct
images per entity with one entity per image. The bare side is numpy/faiss in one process
with everything in memory; the pipeline side is the whole command (Parquet read, rejects,
counters, Parquet write included). Each side runs in its own process, which also gives its
peak RSS. Two ratios: whole process (both timed from process start, imports and model load
included) and steady state (bare compute with the model loaded vs the pipeline's marginal
time from N to 2N captions, which cancels its fixed start-up). The pipeline at N and 2N
also shows whether peak memory grows with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks._common import run_child  # noqa: E402

WORDS = (
    "photo view sunset night old new beautiful famous small big red blue green city river "
    "museum travel summer winter close-up aerial vintage modern street garden portrait wall "
    "poster art print wooden white black golden ancient tourist crowd morning fog snow"
).split()


def make_captions(n: int, seed: int = 0, text: str = "real") -> list[str]:
    """`n` captions, half of them naming a catalog entity. `real`: human-written text with
    the lengths of web alt-texts (benchmarks/realtext.py), a title put in at a word
    boundary; `synthetic`: 3-9 words from a short list (uniform and short: it hides what
    padding costs; the figures before 2026-12-03 used it)."""
    sys.path.insert(0, ROOT)
    from pipelines.demo_data.make_corpus import load_catalog

    titles = [e["wikipedia_title"] for e in load_catalog()]
    rng = random.Random(seed)
    out = []
    if text == "real":
        from benchmarks.realtext import alt_texts

        for t in alt_texts(n, seed)[0]:
            if rng.random() < 0.5:
                words = t.split(" ")
                words.insert(rng.randrange(len(words) + 1), rng.choice(titles))
                t = " ".join(words)
            out.append(t)
        return out
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(3, 9))
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words) + 1), rng.choice(titles))
        out.append(" ".join(words) + f" {i}")
    return out


def write_corpus(path: str, captions: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"https://bench.invalid/{i}.jpg" for i in range(len(captions))]
    pq.write_table(pa.table({"URL": urls, "TEXT": captions}), path, row_group_size=4096)


def bare(index_dir: str, corpus: str, k: int, m: int, min_score: float, threads: int) -> dict:
    """The same compute without Beam: encode, search, top-K per entity, one entity per image."""
    from collections import defaultdict

    import faiss
    import pyarrow.parquet as pq
    import torch

    from transforms.models.embedding import load_sentence_transformer

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    model = load_sentence_transformer("all-MiniLM-L6-v2")
    index = faiss.read_index(os.path.join(index_dir, "entities.faiss"))
    t0 = time.perf_counter()
    table = pq.read_table(corpus)
    texts = [" ".join(t.split()) for t in table["TEXT"].to_pylist()]
    urls = table["URL"].to_pylist()
    vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    scores, ids = index.search(vecs, m)
    per_entity = defaultdict(list)
    for i in range(len(texts)):
        for e, s in zip(ids[i], scores[i]):
            if e >= 0 and s >= min_score:
                per_entity[int(e)].append((-float(s), urls[i]))
    best = {}
    for e, items in per_entity.items():
        items.sort()
        for rank, (s, url) in enumerate(items[:k], start=1):
            cand = (s, rank, e)
            if url not in best or cand < best[url]:
                best[url] = cand
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "captions": len(texts), "kept": len(best)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=20000)
    ap.add_argument("--text", choices=("real", "synthetic"), default="real",
                    help="caption text: real lengths (default) or the old uniform short synthetic captions")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--min_score", type=float, default=0.3)
    ap.add_argument("--out", default="/tmp/select_bench")
    ap.add_argument("--bare_only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = os.cpu_count() or 1
    index_dir = os.path.join(args.out, "entity_index")
    if args.bare_only:
        sys.path.insert(0, ROOT)
        print(json.dumps(bare(index_dir, os.path.join(args.out, "captions_1x.parquet"), args.k, args.m, args.min_score, threads)))
        return
    os.makedirs(args.out, exist_ok=True)
    for mult in (1, 2):
        write_corpus(os.path.join(args.out, f"captions_{mult}x.parquet"), make_captions(args.captions * mult, text=args.text))
    if not os.path.exists(os.path.join(index_dir, "manifest.json")):
        run_child(["-m", "pipelines.build_entity_index", "--entities", os.path.join(ROOT, "pipelines", "demo_data", "entities.jsonl"), "--output", index_dir])

    bare_whole, bare_rss, out = run_child(
        ["-m", "benchmarks.select_bench", "--out", args.out, "--k", str(args.k), "--m", str(args.m),
         "--min_score", str(args.min_score), "--bare_only"]
    )
    b = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    seconds, rss = {}, {}
    for mult in (1, 2):
        seconds[mult], rss[mult], _ = run_child(
            [
                "-m", "pipelines.select_candidates",
                "--entity_index", index_dir,
                "--captions", os.path.join(args.out, f"captions_{mult}x.parquet"),
                "--output", os.path.join(args.out, f"candidates_{mult}x"),
                "--k", str(args.k), "--per_caption_entities", str(args.m), "--min_score", str(args.min_score),
            ]
        )
    n = args.captions
    bare_steady = b["captions"] / b["seconds"]
    bare_rate = n / bare_whole
    pipe_rate = n / seconds[1]
    pipe_steady = n / (seconds[2] - seconds[1])
    print(f"captions: N={n} (and 2N for the memory check), {args.text} text, entities: 322, k={args.k}, m={args.m}, threads={threads}")
    if args.text == "real":
        from benchmarks.realtext import alt_texts, describe

        print(f"  {alt_texts(0)[1]}; {describe(make_captions(n, text='real'))}")
    print("whole process (imports, model load, read, compute, write):")
    print(f"  bare script                {bare_rate:8.1f} captions/s  ({bare_whole:.1f} s)")
    print(f"  select_candidates          {pipe_rate:8.1f} captions/s  ({seconds[1]:.1f} s)")
    print(f"  ratio pipeline / bare      {pipe_rate / bare_rate:8.3f}")
    print("steady state (bare: compute only, model loaded; pipeline: (t(2N) - t(N)) / N):")
    print(f"  bare encode+search+top-K   {bare_steady:8.1f} captions/s  ({b['seconds']:.1f} s)")
    print(f"  select_candidates          {pipe_steady:8.1f} captions/s  ({seconds[2] - seconds[1]:.1f} s per N)")
    print(f"  ratio pipeline / bare      {pipe_steady / bare_steady:8.3f}")
    print(f"peak RSS: bare {bare_rss} MiB; pipeline {rss[1]} MiB at N, {rss[2]} MiB at 2N captions")


if __name__ == "__main__":
    main()
