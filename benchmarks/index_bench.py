"""Entity-index types at catalog scale: build time, memory, recall@10 against exact search
and queries/s for faiss index_factory strings and their search knob (nprobe / efSearch).

    .venv/bin/python benchmarks/index_bench.py --entities 1000000 \
        [--factories "Flat;IVF1024,Flat;IVF4096,Flat;IVF4096,SQ8;IVF4096,PQ48;IVF4096,PQ96;HNSW32"]

Vectors: N distinct Wikipedia-style titles generated from the demo catalog's words plus
name and place words, a repeated title disambiguated as Wikipedia does ("Alder Basin
(village, 1874)"; `benchmarks/ivf_recall_bench.py`), embedded with the real
all-MiniLM-L6-v2 through its int8 ONNX export (`--text_backend onnx-int8`: ~2x faster here;
its selections agree 0.998 with the torch model's), grouped by token length. The matrix is
cached in `--cache` (a second run skips the ~10 minutes of embedding on 2 cores).

Queries: 10,000 catalog vectors moved to cosine ~0.7 of themselves by isotropic noise (how
build_entity_index calibrates; a caption that names an entity scores 0.5-0.8 against its
title). Truth: exact top-10 by inner product; recall@10 counts a returned entity as right
when its exact score reaches the exact 10th score (the generated catalog repeats titles,
and either of two equal vectors is a right answer). Each index is built with build_entity_index's
own `build_faiss_index` on the whole catalog (training sample: auto, i.e. all 1M); IVF
variants with the same nlist share one coarse k-means (trained once, copied in), so their
differences are the list encoding only. Memory: the serialised index (what a worker loads
and holds), per vector and projected to 6,063,945 entities. Queries/s: one `search` call on
all 10,000 queries with the given threads (a worker searches batches of captions).
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

OVEN_ENTITIES = 6_063_945
DEFAULT_FACTORIES = "Flat;IVF1024,Flat;IVF4096,Flat;IVF4096,SQ8;IVF4096,PQ48;IVF4096,PQ96;HNSW32"


def title_vectors(n: int, cache: str, threads: int) -> np.ndarray:
    path = os.path.join(cache, f"titles_{n}_unique_int8.npy")
    if os.path.exists(path):
        return np.load(path)
    from benchmarks.ivf_recall_bench import titles
    from transforms.models.embedding import encode_by_length
    from transforms.models.text_encoder import OnnxEncoder
    from transforms.models.text_export import export_encoder

    os.makedirs(cache, exist_ok=True)
    enc_dir = os.path.join(cache, "onnx_int8_encoder")
    if not os.path.exists(os.path.join(enc_dir, "encoder.json")):
        export_encoder("all-MiniLM-L6-v2", enc_dir, "onnx-int8")
    model = OnnxEncoder(enc_dir, threads=threads)
    names = titles(n, unique=True)
    t0 = time.perf_counter()
    out = np.empty((n, model.get_sentence_embedding_dimension()), dtype=np.float32)
    step = 65536
    for start in range(0, n, step):
        out[start : start + step] = encode_by_length(model, names[start : start + step], max_texts=2048, max_tokens=2048)
        print(f"  embedded {min(n, start + step):,} / {n:,} titles ({min(n, start + step) / (time.perf_counter() - t0):,.0f}/s)",
              flush=True)
    np.save(path + ".tmp.npy", out)
    os.replace(path + ".tmp.npy", path)
    print(f"{n:,} titles embedded in {time.perf_counter() - t0:.0f} s, e.g. {names[:3]}", flush=True)
    return out


def tie_aware_recall(vectors, queries, got, kth) -> float:
    """Share of returned ids whose exact score reaches the exact k-th score: a generated
    catalog repeats titles, and either of two equal vectors is a right answer."""
    ids = np.where(got < 0, 0, got)
    scores = np.einsum("qd,qkd->qk", queries, vectors[ids])
    return float(np.mean((scores >= kth) & (got >= 0)))


def knob_values(index) -> tuple[str | None, list[int]]:
    from transforms.stages.build_entity_index import ivf_lists, search_parameter

    param = search_parameter(index)
    if param == "nprobe":
        top = ivf_lists(index)
        return param, [v for v in (1, 4, 16, 32, 64, 128, 256) if v < top]
    if param == "efSearch":
        return param, [16, 32, 64, 128, 256]
    return None, [0]


def shared_quantizer(factory: str, vectors: np.ndarray, trained: dict):
    """For IVF<n>,<codes>: an index whose coarse quantizer is the k-means of IVF<n>,Flat
    trained earlier in this run (faiss then trains only the list codes)."""
    import faiss

    from transforms.stages.build_entity_index import new_faiss_index

    index = new_faiss_index(vectors.shape[1], factory)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or int(ivf.nlist) not in trained:
        return index
    centroids = trained[int(ivf.nlist)]
    ivf.quantizer.add(centroids)
    ivf.quantizer.is_trained = True
    return index


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=1_000_000)
    ap.add_argument("--factories", default=DEFAULT_FACTORIES, help="semicolon-separated index_factory strings")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/entityforge-bench")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    import faiss

    from transforms.stages.build_entity_index import calibration_queries, ivf_lists

    faiss.omp_set_num_threads(args.threads)
    vectors = title_vectors(args.entities, args.cache, args.threads)
    n, dim = vectors.shape
    queries = calibration_queries(vectors, args.queries, seed=1)
    t0 = time.perf_counter()
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    truth_scores, _ = exact.search(queries, args.k)
    kth = truth_scores[:, -1:] - 1e-5
    del exact
    print(f"{n:,} x {dim} title vectors (all-MiniLM-L6-v2, int8 ONNX, on distinct generated titles); {len(queries):,} queries at cosine "
          f"~0.7; exact top-{args.k} in {time.perf_counter() - t0:.1f} s; {args.threads} threads", flush=True)

    rows = []
    trained: dict[int, np.ndarray] = {}
    header = (f"{'index_factory':<16} {'param':>12} {'build s':>8} {'MiB':>7} {'B/vec':>6} {'GiB@6M':>7} "
              f"{'recall@' + str(args.k):>10} {'queries/s':>10}")
    print(header, flush=True)
    for factory in [f.strip() for f in args.factories.split(";") if f.strip()]:
        t0 = time.perf_counter()
        index = shared_quantizer(factory, vectors, trained)
        if not index.is_trained:
            index.train(vectors)
        for start in range(0, n, 65536):
            index.add(np.ascontiguousarray(vectors[start : start + 65536]))
        build = time.perf_counter() - t0
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf_lists(index) not in trained and factory.endswith(",Flat"):
            trained[ivf_lists(index)] = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        size = len(faiss.serialize_index(index))
        param, values = knob_values(index)
        space = faiss.ParameterSpace()
        for v in values:
            if param:
                space.set_index_parameter(index, param, v)
            t1 = time.perf_counter()
            _, got = index.search(queries, args.k)
            qps = len(queries) / (time.perf_counter() - t1)
            recall = tie_aware_recall(vectors, queries, got, kth)
            row = {"index_factory": factory, "param": param, "value": v, "build_s": round(build, 1),
                   "bytes": size, "bytes_per_vector": round(size / n, 1),
                   "gib_at_6m": round(size / n * OVEN_ENTITIES / 2**30, 2),
                   f"recall_at_{args.k}": round(recall, 4), "queries_per_s": round(qps, 1)}
            rows.append(row)
            label = f"{param}={v}" if param else "exact"
            print(f"{factory:<16} {label:>12} {build:>8.0f} {size / 2**20:>7.0f} {size / n:>6.0f} "
                  f"{row['gib_at_6m']:>7.2f} {recall:>10.3f} {qps:>10,.0f}", flush=True)
        del index
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"entities": n, "dim": dim, "queries": len(queries), "k": args.k, "threads": args.threads,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
