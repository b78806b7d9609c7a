"""Reduced-scale JPEG decoding (Pillow's `draft`) for CLIP inputs: what it saves in host
decode time and what it changes in the pixels and embeddings decontamination compares.

    .venv/bin/python benchmarks/draft_bench.py [--images 600] [--photos 'DIR/*.jpg,...'] [--clip_model ViT-S-32] [--repeats 2]

Photos: the real photographs installed on this machine (scikit-learn's, matplotlib's and,
when installed, scikit-image's sample photos; `--photos` adds others), cut into web-sized
JPEGs: a random crop of 70-100% of each side, resized so its longer side follows a
log-normal around 680 px (the median web photo is ~680 x 451), saved at JPEG quality 75-95.
A share of them had to be upscaled from the small sample photos: upscaled pixels are
smoother than a camera's, which the report states.

For every JPEG: decode at full size vs `draft` at the model's input size (a DCT-domain
1/2, 1/4 or 1/8 scale that keeps both sides >= the input size; Pillow then reads less),
each followed by open_clip's own preprocess. Printed:

* host throughput (1 thread): decode + preprocess images/s, full vs draft, and the share
  of JPEGs where draft applies (both sides >= 2 x the input size);
* pixels: mean |difference| of the preprocessed tensors (normalised units), draft vs full,
  next to the difference a near-duplicate already has (the same photo at 0.6-0.9x its size,
  re-encoded at another quality, full decode on both) which decontamination must match;
* embeddings (random-weight CLIP, same compute as real weights; the similarities of a
  random network are not those of a trained one, so read them as a second opinion on the
  pixel figures): cosine(full, draft) of each image; cosine of each near-duplicate pair
  with full decode on both sides and with draft on both sides.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def installed_photos() -> list[str]:
    import importlib.util

    found = []
    for pkg, pattern in (
        ("sklearn", "datasets/images/*.jpg"),
        ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
        ("skimage", "data/*.png"),
        ("skimage", "data/*.jpg"),
    ):
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            found += glob.glob(os.path.join(list(spec.submodule_search_locations)[0], pattern))
    return found


# Sample images of those packages that are not photographs of a scene (a colour wheel, a
# silhouette, a logo, a test phantom) or repeat another (the right view of a stereo pair).
NOT_PHOTOS = {"color.png", "horse.png", "logo.png", "phantom.png", "motorcycle_right.png"}


def load_photos(paths: list[str]) -> list:
    from PIL import Image

    out = []
    for p in sorted(set(paths)):
        if os.path.basename(p) in NOT_PHOTOS:
            continue
        try:
            img = Image.open(p)
            if img.mode not in ("RGB", "RGBA") or min(img.size) < 256:
                continue  # grey scans, masks, icons: not colour photographs
            out.append((os.path.basename(p), img.convert("RGB")))
        except OSError:
            continue
    return out


def web_jpegs(photos: list, n: int, seed: int = 0) -> tuple[list[bytes], list[bytes], float]:
    """`n` web-sized JPEGs and a near-duplicate of each; the share that was upscaled."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs, dups, upscaled = [], [], 0
    for i in range(n):
        _, img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        long_side = float(np.clip(rng.lognormal(np.log(680), 0.35), 320, 1600))
        scale = long_side / max(crop.size)
        upscaled += scale > 1
        crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))), Image.LANCZOS)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
        jpegs.append(buf.getvalue())
        f = rng.uniform(0.6, 0.9)
        dup = crop.resize((max(1, round(crop.size[0] * f)), max(1, round(crop.size[1] * f))), Image.BICUBIC)
        buf = io.BytesIO()
        dup.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
        dups.append(buf.getvalue())
    return jpegs, dups, upscaled / n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--photos", default="", help="comma list of extra photo globs")
    ap.add_argument("--clip_model", default="ViT-S-32")
    ap.add_argument("--pipeline", type=int, default=400,
                    help="also run decontaminate with --decode_draft yes and no on this many of the JPEGs as "
                         "candidates (and a tenth as evaluation images); 0 = skip")
    ap.add_argument("--out", default="/tmp/entityforge-draft")
    ap.add_argument("--repeats", type=int, default=2,
                    help="time each side this many times and keep the best (host decode and the decontaminate runs)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    import torch

    from transforms.io.images import decode_image
    from transforms.models.clip import load_open_clip

    paths = installed_photos() + [p for g in args.photos.split(",") if g for p in glob.glob(g)]
    photos = load_photos(paths)
    if not photos:
        raise SystemExit("no colour photographs found; pass --photos 'DIR/*.jpg'")
    jpegs, dups, upscaled = web_jpegs(photos, args.images)
    torch.manual_seed(0)
    model, preprocess = load_open_clip(args.clip_model, None, "cpu", threads=1)
    size = model.visual.image_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    sizes = np.array([decode_image(j).image.size for j in jpegs])
    applies = float(np.mean(np.min(sizes, axis=1) >= 2 * side))
    print(f"{len(jpegs)} web-sized JPEGs cut from {len(photos)} real photos ({', '.join(n for n, _ in photos)}); "
          f"median {int(np.median(sizes[:, 0]))} x {int(np.median(sizes[:, 1]))}, {upscaled:.0%} upscaled from the "
          f"sample photos; {args.clip_model} input {side} px; draft applies to {applies:.0%}", flush=True)

    def pixels(blobs, draft):
        return [preprocess(decode_image(b, draft=(side, side) if draft else None).image) for b in blobs]

    speed = {}
    for draft in (False, True) * args.repeats:
        t0 = time.perf_counter()
        pixels(jpegs, draft)
        speed.setdefault(draft, []).append(len(jpegs) / (time.perf_counter() - t0))
    full_px, draft_px = pixels(jpegs, False), pixels(jpegs, True)
    dup_full_px, dup_draft_px = pixels(dups, False), pixels(dups, True)
    d_draft = np.array([float((a - b).abs().mean()) for a, b in zip(full_px, draft_px)])
    d_dup = np.array([float((a - b).abs().mean()) for a, b in zip(full_px, dup_full_px)])
    full_s, draft_s = max(speed[False]), max(speed[True])
    print(f"host decode + preprocess, 1 thread (best of {args.repeats}):")
    print(f"  full decode        {full_s:7.1f} images/s")
    print(f"  draft decode       {draft_s:7.1f} images/s   ratio {draft_s / full_s:.2f}")
    print("preprocessed pixels, mean |difference| (normalised units), median / 95th percentile:")
    print(f"  draft vs full, same JPEG                      {np.median(d_draft):.4f} / {np.percentile(d_draft, 95):.4f}")
    print(f"  near-duplicate vs original, full decode       {np.median(d_dup):.4f} / {np.percentile(d_dup, 95):.4f}")

    def embed(px):
        out = []
        with torch.no_grad():
            for s in range(0, len(px), 32):
                out.append(torch.nn.functional.normalize(model.encode_image(torch.stack(px[s : s + 32])).float(), dim=-1))
        return torch.cat(out).numpy()

    torch.set_num_threads(2)
    e_full, e_draft, e_dup_full, e_dup_draft = embed(full_px), embed(draft_px), embed(dup_full_px), embed(dup_draft_px)
    same = np.sum(e_full * e_draft, axis=1)
    dup_ff = np.sum(e_full * e_dup_full, axis=1)
    dup_dd = np.sum(e_draft * e_dup_draft, axis=1)
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(e_full))
    other = np.sum(e_full * e_full[perm], axis=1)[perm != np.arange(len(perm))]
    print(f"random-weight {args.clip_model} cosines, median / 5th percentile:")
    print(f"  same JPEG, draft vs full                      {np.median(same):.4f} / {np.percentile(same, 5):.4f}")
    print(f"  near-duplicate pair, full decode both sides   {np.median(dup_ff):.4f} / {np.percentile(dup_ff, 5):.4f}")
    print(f"  near-duplicate pair, draft both sides         {np.median(dup_dd):.4f} / {np.percentile(dup_dd, 5):.4f}")
    print(f"  different photos (for scale)                  {np.median(other):.4f} / {np.percentile(other, 5):.4f}")
    for t in (0.95,):
        print(f"  near-duplicate pairs above {t}: full {np.mean(dup_ff > t):.3f}, draft {np.mean(dup_dd > t):.3f}")
    if args.pipeline:
        pipeline_speed(args, jpegs[: args.pipeline], dups[: max(1, args.pipeline // 10)])


def pipeline_speed(args, cands: list[bytes], evals: list[bytes]) -> None:
    """decontaminate on the DirectRunner (2 threads), --decode_draft yes vs no, same inputs:
    the whole command in a fresh process each time."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks._common import run_child
    from transforms.schema import Candidate, arrow_schema, to_row

    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(os.path.join(args.out, "eval"))
    for j, b in enumerate(evals):
        with open(os.path.join(args.out, "eval", f"e{j:05d}.jpg"), "wb") as f:
            f.write(b)
    rows = [to_row(Candidate(key=f"k{i:06d}", url=f"http://b/{i}", caption="c", qid="Q1", title="T", image=b))
            for i, b in enumerate(cands)]
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Candidate)), os.path.join(args.out, "c.parquet"),
                   row_group_size=64)
    print(f"decontaminate, {len(cands)} candidates + {len(evals)} evaluation images (near-duplicates of the first "
          f"{len(evals)}), {args.clip_model} random weights, 2 threads, whole command:")
    result = {}
    for draft in ("no", "yes") * args.repeats:
        out = os.path.join(args.out, f"out_{draft}")
        shutil.rmtree(out, ignore_errors=True)
        seconds, rss, _ = run_child(["-m", "pipelines.decontaminate", "--input", os.path.join(args.out, "c.parquet"),
                                     "--eval_images", os.path.join(args.out, "eval"), "--output", out,
                                     "--clip_model", args.clip_model, "--clip_pretrained", "none",
                                     "--formats", "parquet", "--threads", "2", "--decode_draft", draft])
        with open(os.path.join(out, "manifest.json")) as f:
            dropped = json.load(f)["counters"].get("decontaminate_dropped", 0)
        best = result.get(draft)
        if best is None or seconds < best[0]:
            result[draft] = (seconds, rss, dropped)
    for draft in ("no", "yes"):
        seconds, rss, dropped = result[draft]
        print(f"  --decode_draft {draft:<3}  {(len(cands) + len(evals)) / seconds:6.1f} images/s  ({seconds:.1f} s, "
              f"peak RSS {rss} MiB, {dropped} dropped as near-duplicates)")
    print(f"  ratio yes / no  {result['no'][0] / result['yes'][0]:.2f}")


if __name__ == "__main__":
    main()
