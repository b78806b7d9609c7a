"""decontaminate (DirectRunner) vs bare open_clip on the same images, model and threads.

    python benchmarks/decontaminate_bench.py [--images 1000] [--clip_model ViT-S-32] [--device cpu]

Both sides decode the same JPEGs with Pillow, apply the preprocess transform
`open_clip.create_model_and_transforms` returns, run `encode_image` in batches of 32,
L2-normalise, and compare every candidate with every evaluation image by one matrix product
against the threshold. The bare side holds everything in memory; the pipeline side is the
whole `python -m pipelines.decontaminate` command (Parquet read, decode with all the checks,
rejects, one shard format written). Random weights (`--clip_pretrained none`): the compute
is the same as with real weights. Each side runs in its own process. Two ratios: whole
process (both timed from process start) and steady state (bare compute with the model
loaded vs the pipeline's marginal time from N to 2N images). Goal: >= 0.8.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks._common import run_child  # noqa: E402


def photo(seed: int, size: int = 256) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_inputs(out: str, n: int, n_eval: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.schema import Candidate, arrow_schema, to_row

    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    for j in range(n_eval):
        with open(os.path.join(out, "eval", f"e{j:04d}.jpg"), "wb") as f:
            f.write(photo(10_000_000 + j))
    for mult in (1, 2):
        rows = [
            to_row(Candidate(key=f"k{i:07d}", url=f"http://b/{i}", caption="c", qid="Q1", title="T", image=photo(i)))
            for i in range(n * mult)
        ]
        pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Candidate)), os.path.join(out, f"cands_{mult}x.parquet"), row_group_size=256)


def bare(out: str, model_name: str, threshold: float, threads: int, device: str) -> dict:
    import open_clip
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    torch.manual_seed(0)  # the same random weights as the pipeline's --clip_pretrained none
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device=device)
    model.eval()

    def embed(blobs):
        vecs = []
        for s in range(0, len(blobs), 32):
            x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[s : s + 32]]).to(device)
            with torch.no_grad():
                vecs.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(vecs)

    t0 = time.perf_counter()
    eval_dir = os.path.join(out, "eval")
    E = embed([open(os.path.join(eval_dir, f), "rb").read() for f in sorted(os.listdir(eval_dir))])
    images = pq.read_table(os.path.join(out, "cands_1x.parquet"), columns=["image"])["image"].to_pylist()
    C = embed(images)
    kept = int(((C @ E.T).max(axis=1) <= np.float32(threshold)).sum())
    return {"seconds": time.perf_counter() - t0, "images": len(images), "kept": kept}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--eval_images", type=int, default=100)
    ap.add_argument("--clip_model", default="ViT-S-32")
    ap.add_argument("--device", default="cpu")
    # 1.0 keeps every candidate, so the pipeline also pays for writing all of them (random
    # weights put these synthetic images far above 0.95 with each other).
    ap.add_argument("--threshold", type=float, default=1.0)
    ap.add_argument("--out", default="/tmp/decontaminate_bench")
    ap.add_argument("--bare_only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = os.cpu_count() or 1
    if args.bare_only:
        print(json.dumps(bare(args.out, args.clip_model, args.threshold, threads, args.device)))
        return
    write_inputs(args.out, args.images, args.eval_images)
    bare_whole, bare_rss, out = run_child(
        ["-m", "benchmarks.decontaminate_bench", "--bare_only", "--out", args.out, "--clip_model", args.clip_model,
         "--threshold", str(args.threshold), "--device", args.device]
    )
    b = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    seconds, rss = {}, {}
    for mult in (1, 2):
        seconds[mult], rss[mult], _ = run_child(
            [
                "-m", "pipelines.decontaminate",
                "--input", os.path.join(args.out, f"cands_{mult}x.parquet"),
                "--eval_images", os.path.join(args.out, "eval"),
                "--output", os.path.join(args.out, f"out_{mult}x"),
                "--clip_model", args.clip_model, "--clip_pretrained", "none",
                "--threshold", str(args.threshold), "--formats", "parquet", "--device", args.device,
            ]
        )
    n = args.images
    manifest = json.load(open(os.path.join(args.out, "out_1x", "manifest.json")))
    assert manifest["counters"].get("written_samples_parquet", 0) == b["kept"], "pipeline and bare disagree on what to keep"
    bare_rate, pipe_rate = n / bare_whole, n / seconds[1]
    bare_steady, pipe_steady = b["images"] / b["seconds"], n / (seconds[2] - seconds[1])
    print(f"images: N={n} candidates (and 2N), {args.eval_images} eval images, {args.clip_model}, "
          f"device={args.device}, threads={threads}; both sides kept {b['kept']}")
    print("whole process (imports, model load, read, decode, embed, compare, write):")
    print(f"  bare open_clip             {bare_rate:8.1f} images/s  ({bare_whole:.1f} s)")
    print(f"  decontaminate              {pipe_rate:8.1f} images/s  ({seconds[1]:.1f} s)")
    print(f"  ratio pipeline / bare      {pipe_rate / bare_rate:8.3f}")
    print("steady state (bare: compute with model loaded; pipeline: (t(2N) - t(N)) / N):")
    print(f"  bare open_clip             {bare_steady:8.1f} images/s  ({b['seconds']:.1f} s)")
    print(f"  decontaminate              {pipe_steady:8.1f} images/s  ({seconds[2] - seconds[1]:.1f} s per N)")
    print(f"  ratio pipeline / bare      {pipe_steady / bare_steady:8.3f}")
    print(f"peak RSS: bare {bare_rss} MiB; pipeline {rss[1]} MiB at N, {rss[2]} MiB at 2N")


if __name__ == "__main__":
    main()
