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

import datetime as dt
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.codes.ald import COLLISION_RULES, STRATEGIES, TOKENIZER_FILE, WordPiece, resolve
from transforms.errors import UsageError
from transforms.formats.files import ensure_dir, match_files, read_json, write_json
from transforms.formats.shards import count_records
from transforms.io.readers import REJECTED, ReadCatalogFile
from transforms.io.writers import WriteRejects
from transforms.run.job import build_only, code_version, is_dry_run, run_and_count, sum_counters
from transforms.run.manifest import finish_run
from transforms.run.options import cli_main, new_parser, parse, positive
from transforms.run.progress import counter as progress_counter
from transforms.run.shuffles import MeasureShuffle
from transforms.schema import Entity
from transforms.stages.build_entity_index import CollapseDuplicateQids

log = logging.getLogger(__name__)


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.build_codes")
    p.add_argument("--entities", default=None,
                   help="catalog: JSONL(.gz) or Parquet (default: the entities of --entity_index, which must then be given)")
    p.add_argument("--tokenizer", required=True, help="vocab.txt, tokenizer.json, a local folder or a Hugging Face id")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
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


class ReadIndexEntities(beam.DoFn):
    """An entity index's `entities.parquet` -> Entity records in int_id order (the index
    already collapsed duplicate QIDs; int ids stay the index's)."""

    def process(self, path: str):

        from transforms.formats.files import open_read

        read, ok = progress_counter("catalog_rows_read"), progress_counter("catalog_rows_ok")
        with open_read(path) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(columns=["int_id", "qid", "title"], batch_size=65536):
                for int_id, qid, title in zip(*(batch.column(i).to_pylist() for i in range(3))):
                    read.inc()
                    ok.inc()
                    yield Entity(qid=qid, title=title, file_index=0, row=int_id)


class Tokenize(beam.DoFn):
    def __init__(self, tokenizer: str):
        self.tokenizer = WordPiece(tokenizer)

    def setup(self):
        self.tokenizer.load()

    def process(self, entity):
        # Only what the single-worker resolution uses crosses to it: no summary, no extra
        # fields (at 6M entities the whole records are several GB, these ~0.5 GB).
        slim = Entity(qid=entity.qid, title=entity.title, file_index=entity.file_index, row=entity.row)
        yield slim, self.tokenizer.encode(entity.title)


class ResolveAndWrite(beam.DoFn):
    def __init__(self, args):
        self.args = args

    def _hkc(self, items, tok):
        """Codes from the entity index's embeddings, matched to the catalog by QID."""
        import numpy as np

        from transforms.codes.ald import CodeResult, hkc_codes
        from transforms.formats.files import open_read
        from transforms.stages.build_entity_index import EMBEDDINGS_FILE, ENTITIES_FILE

        root = self.args.entity_index.rstrip("/")
        with open_read(f"{root}/{ENTITIES_FILE}") as f:
            table = pq.read_table(f, columns=["int_id", "qid"])
        row_of = dict(zip(table["qid"].to_pylist(), table["int_id"].to_pylist()))
        with open_read(f"{root}/{EMBEDDINGS_FILE}") as f:
            vectors = np.load(f)
        missing = [qid for qid, _, _ in items if qid not in row_of]
        if missing:
            raise UsageError(f"--entity_index lacks {len(missing)} catalog entities (e.g. {missing[:3]}): build it from the same catalog")
        rows = np.array([row_of[qid] for qid, _, _ in items])
        codes = hkc_codes(
            vectors[rows], [i for _, i, _ in items], length=self.args.code_length, eos=tok.eos_id,
            vocab_ids=tok.regular_ids(), seed=self.args.seed,
        )
        return [CodeResult(qid, i, codes[i], "hkc", len(set(t))) for qid, i, t in items]

    def _rq(self, items, tok):
        """IRGen residual-quantization codes of the index's embeddings (transforms/codes/rq.py)."""
        from transforms.codes.rq import rq_codes
        from transforms.formats.files import open_read
        from transforms.stages.build_entity_index import EMBEDDINGS_FILE, ENTITIES_FILE

        root = self.args.entity_index.rstrip("/")
        with open_read(f"{root}/{ENTITIES_FILE}") as f:
            table = pq.read_table(f, columns=["int_id", "qid"])
        row_of = dict(zip(table["qid"].to_pylist(), table["int_id"].to_pylist()))
        missing = [qid for qid, _, _ in items if qid not in row_of]
        if missing:
            raise UsageError(f"--entity_index lacks {len(missing)} catalog entities (e.g. {missing[:3]}): build it from the same catalog")
        results, self.rq_summary = rq_codes(
            [(qid, i, row_of[qid]) for qid, i, _ in items], lambda: open_read(f"{root}/{EMBEDDINGS_FILE}"),
            levels=self.args.code_length - 1, bits=self.args.rq_bits, eos=tok.eos_id, vocab_ids=tok.regular_ids(),
            seed=self.args.seed, train_size=self.args.rq_train_size,
        )
        return results

    def process(self, entities, counts):
        a = self.args
        tok = WordPiece(a.tokenizer)
        ordered = sorted(entities, key=lambda et: (et[0].file_index, et[0].row))
        items = [(e.qid, i, tokens) for i, (e, tokens) in enumerate(ordered)]
        titles = [e.title for e, _ in ordered]
        self.rq_summary = None
        if a.strategy == "hkc":
            results = self._hkc(items, tok)
        elif a.strategy == "rq":
            results = self._rq(items, tok)
        else:
            results = resolve(
                items, counts, strategy=a.strategy, length=a.code_length, eos=tok.eos_id, vocab_ids=tok.regular_ids(), seed=a.seed,
                collision_rule=a.collision_rule,
            )
        table = pa.table(
            {
                "qid": [r.qid for r in results],
                "int_id": pa.array([r.int_id for r in results], pa.int64()),
                "code": pa.array([r.code for r in results], pa.list_(pa.int32())),
                "method": [r.method for r in results],
                "title": [titles[r.int_id] for r in results],
            }
        )
        with FileSystems.create(FileSystems.join(a.output, "codes.parquet")) as f:
            pq.write_table(table, f)
        # The tokenizer travels with the codes: the trainer and predict must use the same ids.
        with FileSystems.create(FileSystems.join(a.output, TOKENIZER_FILE)) as f:
            f.write(tok.to_json().encode("utf-8"))
        methods = Counter(r.method for r in results)
        eos = tok.eos_id
        real = Counter(sum(1 for t in r.code if t != eos) for r in results)
        n = len(results)
        yield {
            "entities": n,
            "methods": dict(methods),
            "random_fallback_share": round(methods.get("random", 0) / n, 6) if n and a.strategy != "atomic" else None,
            "name_tokens_per_code_histogram": {str(k): v for k, v in sorted(real.items())},
            "unique": len({tuple(r.code) for r in results}) == n,
            # The published collision rule's full-length codes: L real tokens, no EOS.
            "codes_without_eos": sum(1 for r in results if eos not in r.code),
            "mean_name_tokens": float(np.mean([r.n_name_tokens for r in results])) if n else 0.0,
            **({"rq": self.rq_summary} if self.rq_summary else {}),
        }


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None) -> dict:
    args, options = parse(build_parser(), argv)
    positive("--code_length", args.code_length, minimum=2)
    if args.strategy in ("hkc", "rq"):
        if not args.entity_index:
            raise UsageError(f"--strategy {args.strategy} quantizes the entity index's embeddings: give --entity_index")
        if args.strategy == "rq":
            positive("--rq_bits", args.rq_bits)
            positive("--rq_train_size", args.rq_train_size)
        from transforms.stages.build_entity_index import read_manifest

        read_manifest(args.entity_index)
    if args.entities:
        inputs = match_files(args.entities, "--entities")
    elif args.entity_index:
        from transforms.stages.build_entity_index import ENTITIES_FILE, read_manifest

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
    _ = summary_pc | "WriteManifest" >> beam.Map(_write_manifest, args, inputs)
    if is_dry_run(options):
        return build_only(p, "build_codes")
    started = dt.datetime.now(dt.UTC)
    counters, seconds = run_and_count(p, "build_codes")
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
        counters=counters,
        seconds=seconds,
        started=started,
        check=check,
        base=base,
        lines=(
            f"codes: {base['entities']} entities, strategy {args.strategy}, L={args.code_length}, "
            f"random fallbacks {100 * (base['random_fallback_share'] or 0):.2f} %, histogram {base['name_tokens_per_code_histogram']}"
            f" -> {args.output}/codes.parquet",
        ),
    )


def _write_manifest(summary: dict, args, inputs) -> dict:
    manifest = {
        "kind": "entity_codes",
        "strategy": args.strategy,
        "code_length": args.code_length,
        "collision_rule": args.collision_rule,
        "seed": args.seed,
        "tokenizer": args.tokenizer,
        "inputs": inputs,
        **summary,
        "code_version": code_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_json(FileSystems.join(args.output, "manifest.json"), manifest)
    return manifest


if __name__ == "__main__":
    cli_main(run)
