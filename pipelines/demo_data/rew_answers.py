"""Scripted answers for the demo's REW step, written into a response cache that the
`replay` backend reads. NOT model output: no multimodal LLM runs offline without a GPU.

The demo corpus knows which entity each caption was written about (demo/make_corpus.py),
so the scripted annotator answers verify as a good VLM should: `correct` when the
candidate is that entity, `corrected` with that entity's title when it is not, and
`not_an_entity` for unrelated captions. The rationale quotes the entity's summary and the
QA pairs describe the (synthetic) image's measurable properties: dominant colour, size.
The requests are rendered with the refine pipeline's own functions, so the cache keys are
exactly those `python -m pipelines.refine --llm_backend replay` computes.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.demo_data.make_corpus import build_samples, load_catalog
from prompts import load_prompt
from transforms.llm.client import ResponseCache
from transforms.schema import Sample, arrow_schema, from_row
from transforms.stages.refine import RequestSettings, rationale_request, rew_request, verify_request

DEMO_MODEL = "demo-scripted-annotator"
# A second scripted annotator for the compare-then-decide walk-through (docs/outputs.md):
# one request per sample (--rew_requests 1) and, by script, the mistakes a cheaper model
# makes: it misses every other wrong label (keeps the candidate) and drops every fifth
# right one as "not an entity". NOT model output either.
DEMO_CHEAP_MODEL = "demo-scripted-cheap"
# The refine defaults (--temperature 0 --max_tokens 512 --seed 0): part of the cache key.
SAMPLING = {"temperature": 0.0, "max_tokens": 512, "seed": 0}
COLOURS = {
    "red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 50),
    "orange": (240, 140, 30), "purple": (130, 50, 160), "pink": (240, 150, 190), "brown": (120, 80, 40),
    "grey": (128, 128, 128), "black": (20, 20, 20), "white": (235, 235, 235), "teal": (30, 140, 140),
}


def _colour(image: bytes) -> str:
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - rgb) ** 2).sum()))


def _first_sentence(text: str | None) -> str:
    if not text:
        return ""
    return text.split(". ")[0].rstrip(".") + "."


def build_demo_cache(samples_glob: str, input_out: str, cache_dir: str, n: int = 30, seed: int = 0) -> dict:
    catalog = {e["wikidata_id"]: e for e in load_catalog()}
    by_title = {e["wikipedia_title"]: q for q, e in catalog.items()}
    origin = {s["key"]: s["why"] for s in build_samples(seed)}
    rows = pq.read_table(sorted(glob.glob(samples_glob))).to_pylist()
    rows.sort(key=lambda r: r["key"])
    # Sample keys are `<shard>/<corpus key>`; the corpus builder knows the corpus key.
    about = lambda r: origin.get(r["key"].rsplit("/", 1)[-1], "unrelated")  # noqa: E731
    wrong = [r for r in rows if about(r).startswith("about ") and about(r)[6:] != r["title"]]
    right = [r for r in rows if about(r)[6:] == r["title"]]
    unrelated = [r for r in rows if about(r) == "unrelated"]
    chosen = wrong[: n // 3] + unrelated[: n // 6] + right[: n - n // 3 - n // 6]
    chosen.sort(key=lambda r: r["key"])
    os.makedirs(input_out, exist_ok=True)
    path = os.path.join(input_out, "samples.parquet")
    pq.write_table(pa.Table.from_pylist(chosen, schema=arrow_schema(Sample)), path)

    cache = ResponseCache(cache_dir)
    verify_prompt, rationale_prompt = load_prompt("verify"), load_prompt("rationale_qa")
    settings = RequestSettings(DEMO_MODEL, "correct", "wiki_caption", SAMPLING)
    counts = {"correct": 0, "corrected": 0, "not_an_entity": 0}
    for row in chosen:
        sample = from_row(Sample, row)
        summary = catalog.get(sample.qid, {}).get("wikipedia_summary")
        req = verify_request((sample, summary), verify_prompt, settings)
        truth = about(row)
        if truth == "unrelated":
            answer = {"verdict": "not_an_entity", "entity": "", "reason": "The image shows no specific named entity."}
        elif truth[6:] == sample.title:
            answer = {"verdict": "correct", "entity": sample.title, "reason": f"The image matches {sample.title}."}
        else:
            answer = {"verdict": "corrected", "entity": truth[6:], "reason": f"The image shows {truth[6:]}, not {sample.title}."}
        counts[answer["verdict"]] += 1
        cache.put(req.cache_key(), {"text": json.dumps(answer), "usage": {}, "model": DEMO_MODEL})
        if answer["verdict"] == "not_an_entity":
            continue
        final_qid = by_title[answer["entity"]]
        final = dataclasses.replace(sample, qid=final_qid, title=catalog[final_qid]["wikipedia_title"])
        final_summary = catalog[final_qid].get("wikipedia_summary")
        req2 = rationale_request((final, final_summary), rationale_prompt, settings)
        rationale, qa = _rationale_qa(sample, final, final_summary)
        cache.put(req2.cache_key(), {"text": json.dumps({"rationale": rationale, "qa": qa}), "usage": {}, "model": DEMO_MODEL})
    cache.close()  # one segment; refine compacts it before its replay run
    return {"input": path, "samples": len(chosen), "verdicts": counts}


def _rationale_qa(sample, final, summary: str | None) -> tuple[str, list[dict]]:
    rationale = f"The image is labelled as {final.title}. {_first_sentence(summary)}".strip()
    qa = [
        {"question": "What is the dominant colour of the image?", "answer": _colour(sample.image)},
        {"question": "Which entity is labelled?", "answer": final.title[:100]},
        {"question": "Is the picture square?", "answer": "yes" if sample.width == sample.height else "no"},
    ]
    return rationale[:1200], qa


def build_cheap_demo_cache(input_path: str, cache_dir: str, seed: int = 0) -> dict:
    """The cheap annotator's answers to the one request per sample of `--rew_requests 1`
    (prompt `rew`), for the samples of `build_demo_cache`'s input, into `cache_dir`."""
    catalog = {e["wikidata_id"]: e for e in load_catalog()}
    by_title = {e["wikipedia_title"]: q for q, e in catalog.items()}
    origin = {s["key"]: s["why"] for s in build_samples(seed)}
    rows = pq.read_table(input_path).to_pylist()
    cache = ResponseCache(cache_dir)
    prompt = load_prompt("rew")
    settings = RequestSettings(DEMO_CHEAP_MODEL, "correct", "wiki_caption", SAMPLING)
    counts = {"correct": 0, "corrected": 0, "not_an_entity": 0}
    missed = dropped = 0
    for row in rows:
        sample = from_row(Sample, row)
        summary = catalog.get(sample.qid, {}).get("wikipedia_summary")
        truth = origin.get(row["key"].rsplit("/", 1)[-1], "unrelated")
        entity = truth[6:] if truth.startswith("about ") else ""
        answer = {"verdict": "not_an_entity", "entity": "", "reason": "The image shows no specific named entity.",
                  "rationale": "", "qa": []}
        if entity == sample.title:
            dropped += 1
            if dropped % 5 != 0:
                answer = {"verdict": "correct", "entity": sample.title, "reason": f"The image matches {sample.title}."}
        elif entity:
            missed += 1
            if missed % 2:
                answer = {"verdict": "correct", "entity": sample.title, "reason": f"The image matches {sample.title}."}
            else:
                answer = {"verdict": "corrected", "entity": entity, "reason": f"The image shows {entity}, not {sample.title}."}
        if answer["verdict"] != "not_an_entity":
            final_qid = by_title[answer["entity"]]
            final = dataclasses.replace(sample, qid=final_qid, title=catalog[final_qid]["wikipedia_title"])
            answer["rationale"], answer["qa"] = _rationale_qa(sample, final, catalog[final_qid].get("wikipedia_summary"))
        counts[answer["verdict"]] += 1
        req = rew_request((sample, summary), prompt, settings)
        cache.put(req.cache_key(), {"text": json.dumps(answer), "usage": {}, "model": DEMO_CHEAP_MODEL})
    cache.close()
    return {"samples": len(rows), "verdicts": counts}


def main(argv=None) -> dict:
    """The demo's REW input (a sample of the decontaminated shards) and both scripted
    annotators' response caches."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", required=True, help="the decontaminated shards: samples-*.parquet")
    ap.add_argument("--output", required=True, help="folder for samples.parquet, the samples refine reads")
    ap.add_argument("--cache", required=True, help="response cache of the demo annotator (two requests per sample)")
    ap.add_argument("--cheap_cache", required=True, help="response cache of the cheap annotator (one request per sample)")
    args = ap.parse_args(argv)
    made = build_demo_cache(args.samples, args.output, args.cache)
    made["cheap"] = build_cheap_demo_cache(made["input"], args.cheap_cache)
    print(json.dumps(made, indent=2))
    return made


if __name__ == "__main__":
    main()
