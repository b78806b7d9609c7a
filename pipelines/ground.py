"""Map free-text entity names to catalog QIDs.

    python -m pipelines.ground --entity_index out/entity_index --input names.jsonl --output grounded.jsonl

Input: JSON lines with a `text` field (the name) and optionally `candidate_qid` (preferred
when several QIDs share the title); every other field is passed through. Output: the same
lines plus `qid`, `title`, `method` (exact | normalized | disambiguation | embedding |
ungrounded), `score` and `ambiguous` (other QIDs with the same title). Lines that are not
JSON objects go to <output>.rejected.jsonl with their reason. See transforms/stages/ground.py
for the matching rules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from transforms.formats import safe_json
from transforms.formats.files import match_files
from transforms.io.readers import ListFiles
from transforms.models.text_encoder import index_encoder
from transforms.run.job import (
    build_only,
    format_counters,
    is_dry_run,
    run_and_count,
    threads_per_process,
    worker_processes,
)
from transforms.run.options import cli_main, new_parser, parse
from transforms.run.progress import counter as progress_counter
from transforms.schema import Reject
from transforms.stages.build_entity_index import read_manifest
from transforms.stages.refine import GroundingHandler, json_item


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.ground")
    p.add_argument("--entity_index", required=True, help="directory written by build_entity_index")
    p.add_argument("--input", required=True, help="JSON lines with a 'text' field")
    p.add_argument("--output", required=True, help="output JSON lines file")
    p.add_argument("--min_ground_score", type=float, default=0.8, help="embedding fallback floor (cosine)")
    p.add_argument("--threads", type=int, default=0, help="torch/faiss threads; 0 = cores / processes")
    p.add_argument(
        "--share_grounding",
        choices=("auto", "yes", "no"),
        default="auto",
        help="hold the grounding tables, the faiss index and the text encoder once per machine and "
        "serve them to every SDK process (auto: when the runner starts more than one process per machine)",
    )
    return p


def parse_line(line: str):
    progress_counter("names_read").inc()
    try:
        obj = safe_json.loads(line)
    except ValueError as e:
        yield beam.pvalue.TaggedOutput("rejected", Reject(stage="ground", reason="bad_json", detail=str(e), record_json=line[:1000]))
        return
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        yield beam.pvalue.TaggedOutput(
            "rejected", Reject(stage="ground", reason="missing_text", detail="expected an object with a string 'text'", record_json=line[:1000])
        )
        return
    yield obj


def to_line(element) -> str:
    obj, g = element
    progress_counter(f"grounded_{g.method}").inc()
    out = {**obj, "qid": g.qid, "title": g.title, "method": g.method, "score": round(float(g.score), 6), "ambiguous": g.ambiguous}
    return json.dumps(out, ensure_ascii=False)


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None) -> dict:
    args, options = parse(build_parser(), argv)
    manifest = read_manifest(args.entity_index)
    match_files(args.input, "--input")  # a typo fails here, before any work
    threads = threads_per_process(options, args.threads)
    p = test_pipeline or beam.Pipeline(options=options)
    parsed = (
        p
        | "Files" >> ListFiles(args.input)
        | "Read" >> beam.io.ReadAllFromText()
        | "Parse" >> beam.FlatMap(parse_line).with_outputs("rejected", main="names")
    )
    share = {"yes": True, "no": False}.get(args.share_grounding, worker_processes(options) != 1)
    handler = GroundingHandler(
        args.entity_index, index_encoder(manifest, args.entity_index), args.min_ground_score, threads, item_fn=json_item, share_across_processes=share
    )
    _ = (
        parsed.names
        | "Ground" >> RunInference(handler)
        | "ToLine" >> beam.Map(to_line)
        | "Write" >> beam.io.WriteToText(args.output, shard_name_template="", num_shards=1)
    )
    _ = (
        parsed.rejected
        | "RejectJson" >> beam.Map(Reject.to_json)
        | "WriteRejects" >> beam.io.WriteToText(args.output + ".rejected.jsonl", shard_name_template="", num_shards=1)
    )
    if is_dry_run(options):
        return build_only(p, "ground")
    counters, _ = run_and_count(p, "ground")
    print(format_counters(counters, "ground counters"))
    print(f"grounded names: {args.output}   rejects: {args.output}.rejected.jsonl")
    return counters


if __name__ == "__main__":
    cli_main(run)
