"""How the pipelines scale with their input: wall time, peak RSS per process and bytes per
shuffle (from each run's manifest) at several input sizes, as a table, a JSON file and a
log-log plot.

    .venv/bin/python benchmarks/scaling_bench.py [--out /tmp/entityforge-scaling] \
        [--entities 100000,1000000] [--captions 10000,100000,1000000] \
        [--decontaminate 1000x1000,10000x1000,1000x10000,10000x10000] [--plot benchmarks/scaling.png]

Points (each a whole command in a fresh process on the DirectRunner, 2 threads):

* build_entity_index at each `--entities` size: a Wikipedia-shaped catalog of distinct
  generated titles (`benchmarks/ivf_recall_bench.py`) with ~300-character summaries, `--index_factory
  IVF4096,Flat` at every size (the same index type, so the k-means cost is linear in the
  catalog), nprobe calibrated to recall@10 >= 0.95.
* select_candidates at each `--captions` size against the largest index: real-length
  caption text (`benchmarks/realtext.py`) with a catalog title put into half of them, K = 10,
  M = 5.
* decontaminate at each `candidates x evaluation images` pair: 256 x 256 JPEGs,
  random-weight ViT-S-32 (the compute of real weights), threshold 1.0 so that every
  candidate is kept and written with its image (a random network finds every pair of these
  smooth synthetic images "near-duplicate" at 0.95).

The text encoder is `--text_backend static` by default (the distilled static-embedding
model, ~40x the default encoder's speed on CPU): the encoder's own cost is linear per
caption and is measured separately (benchmarks/encoder_bench.py); with the default torch
encoder 1M real captions would take ~1 h of these 2 cores. `--text_backend torch` runs the
same points with it. Results are appended to `<out>/scaling.json` as each point finishes and
a point already there is not run again (`--fresh` to redo them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks._common import run_child  # noqa: E402


def sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for p in text.split(","):
        if p.strip():
            a, b = p.lower().split("x")
            out.append((int(float(a)), int(float(b))))
    return out


def write_catalog(path: str, n: int) -> list[str]:
    """A JSON-lines catalog of `n` generated entities; returns their titles."""
    from benchmarks.ivf_recall_bench import titles

    names = titles(n, seed=7, unique=True)
    if not os.path.exists(path):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for i, t in enumerate(names):
                summary = f"{t} is an entity of the benchmark catalog, number {i}. " * 5
                f.write(json.dumps({"wikidata_id": f"Q{i + 1}", "wikipedia_title": t, "wikipedia_summary": summary}) + "\n")
        os.replace(path + ".tmp", path)
    return names


def write_captions(path: str, n: int, names: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.realtext import alt_texts

    if os.path.exists(path):
        return
    rng = random.Random(n)
    texts = []
    for t in alt_texts(n, seed=n)[0]:
        if rng.random() < 0.5:
            words = t.split(" ")
            words.insert(rng.randrange(len(words) + 1), names[rng.randrange(len(names))])
            t = " ".join(words)
        texts.append(t)
    urls = [f"https://bench.invalid/{n}/{i}.jpg" for i in range(n)]
    with pq.ParquetWriter(path + ".tmp", pa.schema([("URL", pa.string()), ("TEXT", pa.string())])) as w:
        for s in range(0, n, 100_000):
            w.write_table(pa.table({"URL": urls[s : s + 100_000], "TEXT": texts[s : s + 100_000]}), row_group_size=8192)
    os.replace(path + ".tmp", path)


def write_images(folder: str, n_cand: int, n_eval: int) -> tuple[str, str]:
    """Candidates as a select_candidates-style Parquet, evaluation images as JPEG files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.decontaminate_bench import photo
    from transforms.schema import Candidate, arrow_schema, to_row

    cands = os.path.join(folder, f"cands_{n_cand}.parquet")
    evals = os.path.join(folder, f"eval_{n_eval}")
    if not os.path.exists(cands):
        schema = arrow_schema(Candidate)
        with pq.ParquetWriter(cands + ".tmp", schema) as w:
            for s in range(0, n_cand, 1000):
                rows = [to_row(Candidate(key=f"k{i:07d}", url=f"http://b/{i}", caption="c", qid="Q1", title="T",
                                         image=photo(i))) for i in range(s, min(n_cand, s + 1000))]
                w.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=256)
        os.replace(cands + ".tmp", cands)
    if not os.path.exists(evals):
        os.makedirs(evals + ".tmp", exist_ok=True)
        for j in range(n_eval):
            with open(os.path.join(evals + ".tmp", f"e{j:06d}.jpg"), "wb") as f:
                f.write(photo(10_000_000 + j))
        os.replace(evals + ".tmp", evals)
    return cands, evals


def shuffle_bytes(output: str) -> tuple[dict, int]:
    """The run's shuffles (decontaminate: its evaluation-set job's too, prefixed eval_set/)."""
    with open(os.path.join(output, "manifest.json")) as f:
        shuffles = dict(json.load(f).get("shuffles", {}))
    eval_manifest = os.path.join(output, "eval_set", "manifest.json")
    if os.path.exists(eval_manifest):
        with open(eval_manifest) as f:
            shuffles.update({f"eval_set/{k}": v for k, v in json.load(f).get("shuffles", {}).items()})
    return shuffles, sum(v.get("bytes", 0) for v in shuffles.values())


def point(stage: str, size: int, args: list[str], output: str, **extra) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    seconds, rss, stdout = run_child(["-m", f"pipelines.{stage}", *args])
    shuffles, total = shuffle_bytes(output)
    with open(os.path.join(output, "manifest.json")) as f:
        counters = json.load(f).get("counters", {})
    return {"stage": stage, "input": size, "seconds": round(seconds, 1), "peak_rss_mib": rss,
            "shuffle_bytes": total, "shuffles": shuffles, "counters": counters, **extra}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/entityforge-scaling")
    ap.add_argument("--entities", default="100000,1000000")
    ap.add_argument("--captions", default="10000,100000,1000000")
    ap.add_argument("--decontaminate", default="1000x1000,10000x1000,1000x10000,10000x10000",
                    help="comma list of CANDIDATESxEVAL pairs")
    ap.add_argument("--stages", default="build_entity_index,select_candidates,decontaminate")
    ap.add_argument("--index_factory", default="IVF4096,Flat")
    ap.add_argument("--text_backend", default="static")
    ap.add_argument("--clip_model", default="ViT-S-32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default="", help="write the log-log plot (PNG) here")
    ap.add_argument("--fresh", action="store_true", help="run every point again")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "scaling.json")
    results = [] if args.fresh or not os.path.exists(results_path) else json.load(open(results_path))
    done = {(r["stage"], r["input"], r.get("eval", 0)) for r in results}
    stages = args.stages.split(",")
    common = ["--threads", str(args.threads)]

    def record(row: dict) -> None:
        results.append(row)
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)
        print(f"  {row['stage']:<20} input {row['input']:>9,}{' x ' + format(row['eval'], ',') if row.get('eval') else ''}: "
              f"{row['seconds']:>7.1f} s, peak RSS {row['peak_rss_mib']:,} MiB, shuffled {row['shuffle_bytes'] / 2**20:,.1f} MiB",
              flush=True)

    entity_sizes = sizes(args.entities)
    largest = max(entity_sizes)
    catalogs = {}
    for n in entity_sizes:
        catalogs[n] = os.path.join(args.out, f"catalog_{n}.jsonl")
    names = write_catalog(catalogs[largest], largest)
    for n in entity_sizes:
        write_catalog(catalogs[n], n)
    index_dir = lambda n: os.path.join(args.out, f"index_{n}")  # noqa: E731
    if "build_entity_index" in stages or not os.path.exists(os.path.join(index_dir(largest), "manifest.json")):
        for n in entity_sizes:
            if ("build_entity_index", n, 0) in done and os.path.exists(os.path.join(index_dir(n), "manifest.json")):
                continue
            row = point("build_entity_index", n, ["--entities", catalogs[n], "--output", index_dir(n),
                                                  "--index_factory", args.index_factory,
                                                  "--text_backend", args.text_backend, *common], index_dir(n))
            with open(os.path.join(index_dir(n), "manifest.json")) as f:
                row["search"] = json.load(f).get("search", {}).get("params")
            record(row)

    if "select_candidates" in stages:
        for n in sizes(args.captions):
            if ("select_candidates", n, 0) in done:
                continue
            corpus = os.path.join(args.out, f"captions_{n}.parquet")
            write_captions(corpus, n, names)
            out = os.path.join(args.out, f"select_{n}")
            record(point("select_candidates", n, ["--entity_index", index_dir(largest), "--captions", corpus,
                                                  "--output", out, "--k", "10", "--per_caption_entities", "5", "--num_shards", "4",
                                                  *common], out, entities=largest))

    if "decontaminate" in stages:
        for n_cand, n_eval in pairs(args.decontaminate):
            if ("decontaminate", n_cand, n_eval) in done:
                continue
            cands, evals = write_images(args.out, n_cand, n_eval)
            out = os.path.join(args.out, f"decon_{n_cand}x{n_eval}")
            record(point("decontaminate", n_cand, ["--input", cands, "--eval_images", evals, "--output", out,
                                                   "--clip_model", args.clip_model, "--clip_pretrained", "none",
                                                   "--threshold", "1.0", "--formats", "parquet", "--num_shards", "4", *common],
                         out, eval=n_eval))

    print_table(results)
    if args.plot:
        plot(results, args.plot)


def print_table(results: list[dict]) -> None:
    print(f"\n{'stage':<20} {'input':>10} {'eval':>7} {'seconds':>8} {'s per 1k':>9} {'peak RSS MiB':>13} "
          f"{'shuffled MiB':>13} {'kept':>9}")
    for r in sorted(results, key=lambda r: (r["stage"], r.get("eval", 0), r["input"])):
        c = r["counters"]
        kept = c.get("images_kept", c.get("decontaminate_kept", c.get("entities_unique", "")))
        print(f"{r['stage']:<20} {r['input']:>10,} {r.get('eval', '') or '':>7} {r['seconds']:>8.1f} "
              f"{1000 * r['seconds'] / r['input']:>9.2f} {r['peak_rss_mib']:>13,} {r['shuffle_bytes'] / 2**20:>13.1f} "
              f"{kept:>9}")


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series: dict[str, list[dict]] = {}
    for r in results:
        label = r["stage"] + (f" ({r['eval']:,} eval)" if r.get("eval") else "")
        series.setdefault(label, []).append(r)
    for label, rows in sorted(series.items()):
        rows.sort(key=lambda r: r["input"])
        x = [r["input"] for r in rows]
        axes[0].plot(x, [r["seconds"] for r in rows], "o-", label=label)
        axes[1].plot(x, [r["peak_rss_mib"] for r in rows], "o-", label=label)
        if any(r["shuffle_bytes"] for r in rows):
            axes[2].plot(x, [max(r["shuffle_bytes"], 1) / 2**20 for r in rows], "o-", label=label)
    lo = min(r["input"] for r in results)
    hi = max(r["input"] for r in results)
    axes[0].plot([lo, hi], [1, hi / lo], "k:", lw=0.8, label="slope 1 (linear)")
    for ax, title in zip(axes, ("wall seconds", "peak RSS per process (MiB)", "bytes entering shuffles (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input records (entities / captions / candidate images)")
        ax.set_title(title)
        ax.grid(True, which="both", lw=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("entityforge on the DirectRunner, 2 cores: time, memory and shuffle against input size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
