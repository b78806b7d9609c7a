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

from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from transforms.formats.files import match_files
from transforms.io.readers import ListFiles
from transforms.models.text_encoder import index_encoder
from transforms.run.job import run_job, threads_per_process
from transforms.run.manifest import format_counters
from transforms.run.options import add_output, add_share, add_threads, cli_main, new_parser, parse, shared
from transforms.schema import Reject
from transforms.stages.build_entity_index import read_manifest
from transforms.stages.ground import GroundingHandler, json_item, parse_line, to_line


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.ground")
    p.add_argument("--entity_index", required=True, help="directory written by build_entity_index")
    p.add_argument("--input", required=True, help="JSON lines with a 'text' field")
    add_output(p, "output JSON lines file")
    p.add_argument("--min_ground_score", type=float, default=0.8, help="embedding fallback floor (cosine)")
    add_threads(p)
    add_share(p, "--share_grounding", "hold the grounding tables, the faiss index and the text encoder once per machine "
              "and serve them to every SDK process")
    return p


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
    share = shared(args.share_grounding, options)
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
    return run_job(p, options, "ground", lambda ran: report(ran.counters, args.output))


def report(counters: dict, output: str) -> dict:
    """`ground` writes JSON lines, not a dataset folder: no manifest, the counters printed."""
    print(format_counters(counters, "ground counters"))
    print(f"grounded names: {output}   rejects: {output}.rejected.jsonl")
    return counters


if __name__ == "__main__":
    cli_main(run)
