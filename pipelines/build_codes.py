"""Build GER entity codes (ALD by default) for every catalog entity.

    python -m pipelines.build_codes --entity_index out/entity_index --tokenizer bert-base-uncased \\
        --output out/codes [--code_length 4] [--seed 0] [--strategy ald|caption|atomic|hkc|rq]

The entities come from the entity index (its `entities.parquet`: already free of duplicate
QIDs, so their rejects stay in one place, the index's) or from a raw catalog (`--entities`).

A Beam pipeline: titles are tokenized in parallel, token counts are summed over the whole
catalog, then one worker visits the entities in a seeded random order and resolves
collisions (transforms/codes/ald.py). Int ids are the entity index's: dense, in catalog order.
Output: codes.parquet (`qid`, `int_id`, `code` = token ids with EOS, `method`, `title`),
tokenizer.json (the tokenizer the ids belong to, read by trainer.train) and manifest.json (share of random fallbacks, histogram of name tokens per code, methods).
The resolution step holds every entity's tokens on one worker: ~1 GB for the 6M catalog.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.codes.ald import COLLISION_RULES, STRATEGIES, WordPiece
from transforms.errors import UsageError
from transforms.formats.files import ensure_dir, match_files, read_json
from transforms.formats.shards import count_records
from transforms.io.readers import REJECTED, ReadCatalogFile
from transforms.io.writers import WriteRejects
from transforms.run.job import run_job, sum_counters
from transforms.run.manifest import finish_run
from transforms.run.options import add_output, cli_main, new_parser, parse, positive
from transforms.run.shuffles import MeasureShuffle
from transforms.stages.build_codes import ReadIndexEntities, ResolveAndWrite, Tokenize, write_manifest
from transforms.stages.build_entity_index import ENTITIES_FILE, CollapseDuplicateQids, read_manifest

log = logging.getLogger(__name__)


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.build_codes")
    p.add_argument("--entities", default=None,
                   help="catalog: JSONL(.gz) or Parquet (default: the entities of --entity_index, which must then be given)")
    p.add_argument("--tokenizer", required=True, help="vocab.txt, tokenizer.json, a local folder or a Hugging Face id")
    add_output(p)
    p.add_argument("--code_length", type=int, default=4, help="L: tokens per code, EOS included")
    p.add_argument("--seed", type=int, default=0, help="seed of the collision order, random tokens and hkc k-means")
    p.add_argument("--strategy", choices=STRATEGIES, default="ald",
                   help="ald: GER's rarest title tokens; caption: title tokens in order; atomic: random unique tokens; "
                        "hkc: hierarchical k-means of the index embeddings; rq: IRGen's residual quantization of them "
                        "(code_length - 1 levels)")
    p.add_argument("--rq_bits", type=int, default=8, help="rq: bits per level, 2^bits centroids (IRGen: 256)")
    p.add_argument("--rq_train_size", type=int, default=1_000_000, help="rq: embeddings sampled to train the quantizer")
    p.add_argument("--collision_rule", choices=COLLISION_RULES, default="published",
                   help="published: GER's rule, a colliding full code takes its next-rarest token in the EOS slot; "
                        "keep_eos: overwrite the last real token and keep EOS (more random fallbacks)")
    p.add_argument("--entity_index", default=None,
                   help="entity index: its entities are coded when --entities is not given; hkc clusters its embeddings")
    return p


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None) -> dict:
    args, options = parse(build_parser(), argv)
    positive("--code_length", args.code_length, minimum=2)
    if args.strategy in ("hkc", "rq"):
        if not args.entity_index:
            raise UsageError(f"--strategy {args.strategy} quantizes the entity index's embeddings: give --entity_index")
        if args.strategy == "rq":
            positive("--rq_bits", args.rq_bits)
            positive("--rq_train_size", args.rq_train_size)

        read_manifest(args.entity_index)
    if args.entities:
        inputs = match_files(args.entities, "--entities")
    elif args.entity_index:

        read_manifest(args.entity_index)
        inputs = [f"{args.entity_index.rstrip('/')}/{ENTITIES_FILE}"]
    else:
        raise UsageError("give the entities to code: --entity_index DIR (an entity index) or --entities FILE (a catalog)")
    try:
        WordPiece(args.tokenizer).load()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--tokenizer {args.tokenizer!r} could not be loaded: {e}") from e
    p = test_pipeline or beam.Pipeline(options=options)
    if args.entities:
        read = (
            p
            | "Files" >> beam.Create(list(enumerate(inputs)))
            | "ReadCatalog" >> beam.ParDo(ReadCatalogFile()).with_outputs(REJECTED, main="entities")
        )
    else:
        read = (
            p
            | "IndexFile" >> beam.Create(inputs)
            | "ReadIndexEntities" >> beam.ParDo(ReadIndexEntities()).with_outputs(REJECTED, main="entities")
        )
    deduped = (
        read.entities
        | "ByQid" >> beam.Map(lambda e: (e.qid, e))
        | "MeasureByQid" >> MeasureShuffle("group_by_qid")
        | "GroupQid" >> beam.GroupByKey()
        | "Dedup" >> beam.ParDo(CollapseDuplicateQids()).with_outputs(REJECTED, main="entities")
    )
    tokenized = deduped.entities | "Tokenize" >> beam.ParDo(Tokenize(args.tokenizer))
    counts = (
        tokenized
        | "Tokens" >> beam.FlatMap(lambda et: et[1])
        | "MeasureTokens" >> MeasureShuffle("count_tokens")
        | "CountTokens" >> beam.combiners.Count.PerElement()
    )
    summary_pc = (
        tokenized
        | "MeasureEntities" >> MeasureShuffle("all_entities")
        | "AllEntities" >> beam.combiners.ToList()
        | "Resolve" >> beam.ParDo(ResolveAndWrite(args), beam.pvalue.AsDict(counts))
    )
    _ = (read[REJECTED], deduped[REJECTED]) | "Rejects" >> WriteRejects(args.output, ["read_catalog", "dedup"])
    ensure_dir(args.output)
    _ = summary_pc | "WriteManifest" >> beam.Map(write_manifest, args, inputs)
    return run_job(p, options, "build_codes", lambda ran: finish(ran, args), output=args.output)


def finish(ran, args) -> dict:
    base = read_json(FileSystems.join(args.output, "manifest.json"))
    # The codes table counted again in the finished file, not by its writer.
    written = count_records(FileSystems.join(args.output, "codes.parquet"))

    def check(c: dict) -> list[str]:
        problems = []
        rows, ok = c.get("catalog_rows_read", 0), c.get("catalog_rows_ok", 0)
        rejected = sum_counters(c, "rejected_read_catalog_")
        if rows != ok + rejected:
            problems.append(f"catalog rows read {rows} != ok {ok} + rejected {rejected}")
        unique, dups = c.get("entities_unique", 0), c.get("rejected_dedup_duplicate_qid", 0)
        if ok != unique + dups:
            problems.append(f"rows ok {ok} != unique {unique} + duplicates {dups}")
        if unique != written:
            problems.append(f"write_codes: unique entities {unique} != {written} rows in codes.parquet")
        return problems

    return finish_run(
        name="build_codes",
        output=args.output,
        kind="entity_codes",
        **ran.fields(),
        check=check,
        base=base,
        fields={"options": dict(vars(args))},
        lines=(
            f"codes: {base['entities']} entities, strategy {args.strategy}, L={args.code_length}, "
            f"random fallbacks {100 * (base['random_fallback_share'] or 0):.2f} %, histogram {base['name_tokens_per_code_histogram']}"
            f" -> {args.output}/codes.parquet",
        ),
    )


if __name__ == "__main__":
    cli_main(run)
