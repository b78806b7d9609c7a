"""Generate the demo image-text corpus from the bundled catalog and captions (no network).

    python -m pipelines.demo_data.make_corpus --output demo_output/data
    python -m pipelines.demo_data.make_corpus --eval_set_from "CANDIDATES/candidates-*.parquet" --output EVAL

Writes, deterministically for a seed:
  entities.jsonl            copy of the bundled catalog (324 lines, 2 duplicate QIDs)
  webdataset/shard-0000N.tar img2dataset-style shards: KEY.jpg (an image drawn in code),
                            KEY.txt (caption), KEY.json (url, key, caption, width, height)
  laion/part-0000N.parquet  the same captions as LAION metadata (URL, TEXT, WIDTH, HEIGHT)
Captions are the bundled web-style paraphrases (some contain the exact title, some only
describe the entity), "photo of <title>"-style captions for other entities, unrelated
alt-texts, and a few broken rows (empty, bad UTF-8, over-long) that must end in rejected/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import tarfile
from importlib import resources

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

TEMPLATES = [
    "{t}",
    "photo of {t}",
    "{t} - stock image",
    "My trip: visiting the {t}",
    "close-up of {t}, high resolution",
    "{t} wallpaper 4k",
]


def bundled(name: str) -> str:
    return str(resources.files("pipelines.demo_data").joinpath(name))


def load_catalog():
    with open(bundled("entities.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def draw(seed: int, size: int = 96) -> bytes:
    rng = random.Random(seed)
    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.randrange(size - 20), rng.randrange(size - 20)
        x1, y1 = x0 + rng.randrange(8, 40), y0 + rng.randrange(8, 40)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def build_samples(seed: int = 0):
    rng = random.Random(seed)
    catalog = load_catalog()
    titles = {e["wikidata_id"]: e["wikipedia_title"] for e in catalog}
    captions: list[tuple[str, str]] = []  # (caption, why) -- why is only for the reader
    with open(bundled("paraphrases.jsonl"), encoding="utf-8") as f:
        paraphrased = [json.loads(line) for line in f if line.strip()]
    for p in paraphrased:
        for c in p["captions"]:
            captions.append((c, f"about {titles[p['wikidata_id']]}"))
    have = {p["wikidata_id"] for p in paraphrased}
    for qid, title in sorted(titles.items()):
        if qid not in have and rng.random() < 0.6:
            captions.append((rng.choice(TEMPLATES).format(t=title), f"about {title}"))
    with open(bundled("unrelated_captions.txt"), encoding="utf-8") as f:
        captions += [(line.strip(), "unrelated") for line in f if line.strip()]
    rng.shuffle(captions)
    samples = []
    for i, (text, why) in enumerate(captions):
        key = f"{i:09d}"
        samples.append(
            {"key": key, "url": f"https://demo.invalid/img/{key}.jpg", "txt": text.encode("utf-8"), "why": why}
        )
    # Broken rows, to be rejected with a reason.
    n = len(samples)
    samples.append({"key": f"{n:09d}", "url": f"https://demo.invalid/img/{n:09d}.jpg", "txt": b"", "why": "empty"})
    samples.append(
        {"key": f"{n + 1:09d}", "url": f"https://demo.invalid/img/{n + 1:09d}.jpg", "txt": b"Colosseum \xff\xfe night", "why": "bad utf-8"}
    )
    samples.append(
        {"key": f"{n + 2:09d}", "url": f"https://demo.invalid/img/{n + 2:09d}.jpg", "txt": ("spam " * 1000).encode(), "why": "too long"}
    )
    return samples


def write_corpus(output: str, seed: int = 0, shards: int = 4) -> dict:
    os.makedirs(output, exist_ok=True)
    shutil.copy(bundled("entities.jsonl"), os.path.join(output, "entities.jsonl"))
    samples = build_samples(seed)
    wds = os.path.join(output, "webdataset")
    laion = os.path.join(output, "laion")
    os.makedirs(wds, exist_ok=True)
    os.makedirs(laion, exist_ok=True)
    per = -(-len(samples) // shards)
    for s in range(shards):
        chunk = samples[s * per : (s + 1) * per]
        with tarfile.open(os.path.join(wds, f"shard-{s:05d}.tar"), "w") as tar:
            for j, smp in enumerate(chunk):
                image = draw(seed * 100003 + s * per + j)
                meta = {
                    "key": smp["key"],
                    "url": smp["url"],
                    "caption": smp["txt"].decode("utf-8", "replace"),
                    "width": 96,
                    "height": 96,
                    "status": "success",
                }
                for ext, data in (("jpg", image), ("txt", smp["txt"]), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{smp['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        rows = {
            "URL": [x["url"] for x in chunk],
            # LAION stores text; bytes that are not UTF-8 cannot be a string column, so the
            # Parquet copy keeps the caption as binary to carry the broken row too.
            "TEXT": pa.array([x["txt"] for x in chunk], pa.binary()),
            "WIDTH": [96] * len(chunk),
            "HEIGHT": [96] * len(chunk),
        }
        pq.write_table(pa.table(rows), os.path.join(laion, f"part-{s:05d}.parquet"))
    return {
        "entities": os.path.join(output, "entities.jsonl"),
        "webdataset": os.path.join(wds, "shard-*.tar"),
        "laion": os.path.join(laion, "part-*.parquet"),
        "samples": len(samples),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="demo_output/data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval_set_from", default=None, metavar="CANDIDATES_GLOB",
                    help="write the demo evaluation set (copies of some of these candidates' images, and unrelated "
                         "images) into --output instead of the corpus")
    args = ap.parse_args(argv)
    if args.eval_set_from:
        made = write_eval_set(args.eval_set_from, args.output, seed=args.seed)
        print(json.dumps(made, indent=2))
        return
    print(json.dumps(write_corpus(args.output, args.seed), indent=2))


EVAL_KINDS = ("exact", "reencoded", "resized", "cropped")


def write_eval_set(candidates_glob: str, output: str, per_kind: int = 4, unrelated: int = 12, seed: int = 0) -> dict:
    """A demo evaluation set: copies of some selected candidate images (exact bytes,
    re-encoded as JPEG q=60, resized to 2/3, centre-cropped to 80%) plus unrelated images.
    File names say what each is: `<kind>__<candidate key, / as -->.jpg`, `unrelated_<n>.jpg`."""
    import glob as _glob

    files = sorted(_glob.glob(candidates_glob))
    rows = pq.read_table(files, columns=["key", "image"]).to_pylist()
    rows.sort(key=lambda r: r["key"])
    rng = random.Random(seed)
    picked = rng.sample(rows, min(len(rows), per_kind * len(EVAL_KINDS)))
    os.makedirs(output, exist_ok=True)
    made = {}
    for i, row in enumerate(picked):
        kind = EVAL_KINDS[i % len(EVAL_KINDS)]
        # Keys are `<shard>/<corpus key>`: a file name cannot hold the slash.
        name = f"{kind}__{row['key'].replace('/', '--')}.jpg"
        if kind == "exact":
            data = row["image"]
        else:
            img = Image.open(io.BytesIO(row["image"])).convert("RGB")
            w, h = img.size
            if kind == "resized":
                img = img.resize((w * 2 // 3, h * 2 // 3), Image.BICUBIC)
            elif kind == "cropped":
                img = img.crop((w // 10, h // 10, w - w // 10, h - h // 10))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=60 if kind == "reencoded" else 90)
            data = buf.getvalue()
        with open(os.path.join(output, name), "wb") as f:
            f.write(data)
        made[name] = row["key"]
    for n in range(unrelated):
        with open(os.path.join(output, f"unrelated_{n:02d}.jpg"), "wb") as f:
            f.write(draw(10_000_000 + n))
    return made


if __name__ == "__main__":
    main()
