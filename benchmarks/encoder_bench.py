"""Caption encoding on real caption lengths: our encoder handler vs the bare library.

    python benchmarks/encoder_bench.py [--captions 4000] [--threads 2] [--sweep] [--backends torch,onnx,onnx-int8]
    python benchmarks/encoder_bench.py --quality [--captions 10000] [--entities 20000]

The captions are real text mixed to the lengths of web alt-texts (`benchmarks/realtext.py`
prints their figures). All sides use the same sentence-transformer, the same thread count
and the same captions, in one process, model loaded first:

* bare, whole list: `model.encode(all captions, batch_size=32)`, the library's default
  call with everything at once (it sorts by length inside the call): the bar;
* bare, as we called it before: chunks of 256 captions (Beam's batch), `batch_size=64`;
* ours: `SentenceTransformerHandler.run_inference` on Beam-sized chunks (the handler's
  default chunk), which groups captions of a chunk by token length into forward passes
  bounded by `max_tokens_per_batch` padded tokens;
* ours in a pipeline: `RunInference` over the same captions on the DirectRunner.

Ratios are captions/s of a side over the bare whole-list call. `--sweep` also tries
several token budgets and chunk sizes (how the defaults were chosen). `--backends` adds the
handler on each exported ONNX encoder (same threads, same chunks and passes).

`--quality` measures what a faster encoder costs in selection: entities are the demo
catalog's titles plus Wikipedia-style generated titles (benchmarks/ivf_recall_bench.py),
captions the real-length text with a catalog title put into half of them. Each encoder
embeds both sides and the GER rule runs exactly (flat search, top-M proposals above
min_score, top-K per entity, one entity per image). Printed: agreement of the selected
(caption, entity) pairs with the default encoder's, and the share of captions naming an
entity verbatim that are selected for that entity.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--backends", default="", help="comma list of onnx, onnx-int8 to time next to torch")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--entities", type=int, default=20000, help="--quality: catalog size")
    args = ap.parse_args(argv)
    if args.quality:
        return quality(args)

    import numpy as np

    from benchmarks.realtext import alt_texts, describe
    from transforms.models.embedding import (
        DEFAULT_TEXT_MODEL,
        SentenceTransformerHandler,
        load_sentence_transformer,
    )

    texts, source = alt_texts(args.captions)
    print(f"{source}\n{describe(texts)}; {args.threads} threads, {DEFAULT_TEXT_MODEL}")
    model = load_sentence_transformer(DEFAULT_TEXT_MODEL, threads=args.threads)
    model.encode(texts[:64], show_progress_bar=False)  # warm-up
    n = len(texts)

    def bare_whole():
        model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    def bare_chunks(chunk=256, bs=64):
        for i in range(0, n, chunk):
            model.encode(texts[i : i + chunk], batch_size=bs, normalize_embeddings=True, show_progress_bar=False)

    def ours_with(handler, m):
        chunk = handler._batching_kwargs["max_batch_size"]
        out = []
        for i in range(0, n, chunk):
            out.extend(r.inference for r in handler.run_inference(texts[i : i + chunk], m))
        return out

    def ours(handler):
        return ours_with(handler, model)

    handler = SentenceTransformerHandler(DEFAULT_TEXT_MODEL, threads=args.threads)
    bar = timed(bare_whole, n)
    rows = [("bare: encode(all, batch_size=32)", bar)]
    rows.append(("bare: chunks of 256, batch_size=64 (before)", timed(bare_chunks, n)))
    rows.append((f"ours: handler defaults (chunk {handler._batching_kwargs['max_batch_size']}, "
                 f"{handler.max_tokens_per_batch} tokens/forward)", timed(lambda: ours(handler), n)))
    # Same vectors as the library's own call, one caption at a time.
    got = np.stack(ours(handler)[:200])
    want = model.encode(texts[:200], batch_size=1, normalize_embeddings=True, show_progress_bar=False)
    diff = float(np.abs(got - want).max())
    if args.sweep:
        for chunk in (256, 1024, 2048, 4096):
            for budget in (2048, 4096, 8192, 16384):
                h = SentenceTransformerHandler(DEFAULT_TEXT_MODEL, batch_size=chunk, max_tokens_per_batch=budget)
                rows.append((f"ours: chunk {chunk}, {budget} tokens/forward", timed(lambda h=h: ours(h), n)))
    for backend in [b for b in args.backends.split(",") if b]:
        enc = exported(backend, args.threads)
        enc.encode(texts[:64])
        h = SentenceTransformerHandler(DEFAULT_TEXT_MODEL, threads=args.threads)
        rows.append((f"ours: handler defaults, {backend}", timed(lambda h=h, enc=enc: ours_with(h, enc), n)))
    rows.append(("ours: RunInference on the DirectRunner", pipeline_rate(texts, args.threads)))
    for name, rate in rows:
        print(f"  {name:<64} {rate:7.1f} captions/s  ratio {rate / bar:.3f}")
    print(f"  largest difference from one-at-a-time encode: {diff:.2e}")


_EXPORTS: dict = {}


def exported(backend: str, threads: int):
    """The default model exported as `backend` (once per run, into a temporary folder)."""
    import tempfile

    from transforms.models.embedding import DEFAULT_TEXT_MODEL
    from transforms.models.text_encoder import load_encoder_dir
    from transforms.models.text_export import export_encoder

    if backend not in _EXPORTS:
        folder = tempfile.mkdtemp(prefix=f"bench-{backend}-")
        export_encoder(DEFAULT_TEXT_MODEL, folder, backend)
        _EXPORTS[backend] = folder
    return load_encoder_dir(_EXPORTS[backend], threads)


def select_pairs(cap_vecs, ent_vecs, k: int, m: int, min_score: float) -> set:
    """The GER rule, exactly: top-M entities per caption above min_score, top-K captions per
    entity, each caption (image) kept for its best entity only."""
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(ent_vecs.shape[1])
    index.add(np.ascontiguousarray(ent_vecs, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(cap_vecs, dtype=np.float32), m)
    per_entity: dict = {}
    for c in range(len(cap_vecs)):
        for e, sc in zip(ids[c], scores[c]):
            if e >= 0 and sc >= min_score:
                per_entity.setdefault(int(e), []).append((-float(sc), c))
    best: dict = {}
    for e, items in per_entity.items():
        items.sort()
        for rank, (sc, c) in enumerate(items[:k], start=1):
            cand = (sc, rank, e)
            if c not in best or cand < best[c]:
                best[c] = cand
    return {(c, v[2]) for c, v in best.items()}


def quality(args) -> None:
    import random
    import time

    from benchmarks.ivf_recall_bench import titles as generated_titles
    from benchmarks.realtext import alt_texts, describe
    from pipelines.demo_data.make_corpus import load_catalog
    from transforms.models.embedding import DEFAULT_TEXT_MODEL, encode_by_length, load_sentence_transformer
    from transforms.stages.build_entity_index import title_text

    catalog = [e["wikipedia_title"] for e in load_catalog()]
    extra = [t for t in generated_titles(args.entities, seed=1) if t not in set(catalog)]
    entities = (catalog + extra)[: max(len(catalog), args.entities)]
    rng = random.Random(0)
    texts, source = alt_texts(args.captions, seed=3)
    named = {}
    for i, t in enumerate(texts):
        if rng.random() < 0.5:
            e = rng.randrange(len(catalog))
            words = t.split(" ")
            words.insert(rng.randrange(len(words) + 1), catalog[e])
            texts[i] = " ".join(words)
            named[i] = e
    print(f"{source}\n{describe(texts)}; {len(entities)} entities ({len(catalog)} catalog titles named in "
          f"{len(named)} captions); k=10, M=5, min_score 0.3; {args.threads} threads")
    encoders = {"torch": load_sentence_transformer(DEFAULT_TEXT_MODEL, threads=args.threads)}
    for b in [b for b in (args.backends or "onnx,onnx-int8").split(",") if b]:
        encoders[b] = exported(b, args.threads)
    results = {}
    for name, enc in encoders.items():
        t0 = time.perf_counter()
        cap = encode_by_length(enc, texts, 256, 2048)
        rate = len(texts) / (time.perf_counter() - t0)
        ent = encode_by_length(enc, [title_text(t) for t in entities], 256, 2048)
        pairs = select_pairs(cap, ent, 10, 5, 0.3)
        verbatim = sum(1 for c, e in named.items() if (c, e) in pairs) / max(1, len(named))
        results[name] = (pairs, rate, verbatim)
    base = results["torch"][0]
    for name, (pairs, rate, verbatim) in results.items():
        agree = len(pairs & base) / max(1, len(base))
        print(f"  {name:<10} {rate:7.1f} captions/s ({rate / results['torch'][1]:.2f}x)  pairs {len(pairs):6d}  "
              f"agreement with torch {agree:.3f}  verbatim captions selected for their entity {verbatim:.3f}")


def pipeline_rate(texts, threads: int) -> float:
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.models.embedding import DEFAULT_TEXT_MODEL, SentenceTransformerHandler

    handler = SentenceTransformerHandler(DEFAULT_TEXT_MODEL, threads=threads)
    opts = PipelineOptions(["--direct_num_workers", "1"])
    # Model load and pipeline start-up are timed: a short run first, subtracted.
    def run(items):
        t0 = time.perf_counter()
        with beam.Pipeline(options=opts) as p:
            _ = p | beam.Create(items, reshuffle=False) | RunInference(handler) | beam.Map(lambda r: None)
        return time.perf_counter() - t0

    fixed = run(texts[:64])
    whole = run(texts)
    return (len(texts) - 64) / max(1e-9, whole - fixed)


if __name__ == "__main__":
    main()
