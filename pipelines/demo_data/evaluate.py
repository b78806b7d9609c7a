"""The demo's evaluation: an OVEN-format evaluation set over the REW training images (the
"seen" splits: a memorisation check) and new images of entities never trained on
("unseen"), predicted by the trained model with constrained beam search and scored with
OVEN's metric.

    python -m pipelines.demo_data.evaluate --rew demo_output/rew --entities demo_output/data/entities.jsonl \\
        --model demo_output/model --oven_folder demo_output/data/oven_eval \\
        --predictions demo_output/predictions.jsonl --metrics demo_output/metrics.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import pyarrow.parquet as pq


def write_demo_oven(rew_dir: str, entities: str, folder: str, unseen: int = 10, seed: int = 0) -> str:
    """OVEN-format annotations (entity_* and query_* splits) over the REW training images
    (seen) and newly drawn images of entities absent from training (unseen); images in
    OVEN's two-digit sub-folders."""
    import random

    from pipelines.demo_data.make_corpus import draw

    rows = pq.read_table(glob.glob(os.path.join(rew_dir, "samples-*.parquet")), columns=["key", "image", "qid"]).to_pylist()
    rows.sort(key=lambda r: r["key"])
    catalog = [json.loads(line) for line in open(entities, encoding="utf-8") if line.strip()]
    trained = {r["qid"] for r in rows}
    rng = random.Random(seed)
    others = sorted({e["wikidata_id"] for e in catalog} - trained)
    items = [(r["image"], r["qid"], "seen") for r in rows]
    items += [(draw(20_000_000 + n), q, "unseen") for n, q in enumerate(rng.sample(others, min(unseen, len(others))))]
    lines = []
    for n, (image, qid, side) in enumerate(items):
        image_id = f"oven_{n:08d}"
        sub = os.path.join(folder, "images", f"{n % 100:02d}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"{image_id}.jpg"), "wb") as f:
            f.write(image)
        lines.append({"data_id": f"oven_entity_val_{n:08d}", "image_id": image_id, "question": "what is this?",
                      "entity_id": qid, "data_split": f"entity_val_{side}"})
        lines.append({"data_id": f"oven_query_val_{n:08d}", "image_id": image_id, "question": "what is shown in the photo?",
                      "entity_id": qid, "data_split": f"query_val_{side}"})
    path = os.path.join(folder, "oven_val.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return path


def main(argv=None) -> dict:
    from trainer import predict, score

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rew", required=True, help="the refine output folder (the training images)")
    ap.add_argument("--entities", required=True, help="the catalog (JSON lines)")
    ap.add_argument("--model", required=True, help="the trainer.train output folder")
    ap.add_argument("--oven_folder", required=True, help="folder for the OVEN annotations and images")
    ap.add_argument("--predictions", required=True, help="predictions JSON lines")
    ap.add_argument("--metrics", required=True, help="OVEN metrics JSON")
    args = ap.parse_args(argv)
    oven = write_demo_oven(args.rew, args.entities, args.oven_folder)
    pred = predict.run(["--checkpoint", args.model, "--oven", oven, "--images", os.path.join(args.oven_folder, "images"),
                        "--output", args.predictions])
    metrics = score.main(["--reference", oven, "--predictions", args.predictions, "--output", args.metrics])
    return {"predict": pred, "metrics": metrics}


if __name__ == "__main__":
    main()
