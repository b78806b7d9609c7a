"""Caption encoding on real caption lengths: our encoder handler vs the bare library.

    python benchmarks/encoder_bench.py [--captions 4000] [--threads 2] [--sweep]

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
several token budgets and chunk sizes (how the defaults were chosen).
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
    args = ap.parse_args(argv)

    import numpy as np

    from benchmarks.realtext import alt_texts, describe
    from transforms.embedding import DEFAULT_TEXT_MODEL, SentenceTransformerHandler, load_sentence_transformer

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

    def ours(handler):
        chunk = handler._batching_kwargs["max_batch_size"]
        out = []
        for i in range(0, n, chunk):
            out.extend(r.inference for r in handler.run_inference(texts[i : i + chunk], model))
        return out

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
    rows.append(("ours: RunInference on the DirectRunner", pipeline_rate(texts, args.threads)))
    for name, rate in rows:
        print(f"  {name:<64} {rate:7.1f} captions/s  ratio {rate / bar:.3f}")
    print(f"  largest difference from one-at-a-time encode: {diff:.2e}")


def pipeline_rate(texts, threads: int) -> float:
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.embedding import DEFAULT_TEXT_MODEL, SentenceTransformerHandler

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
