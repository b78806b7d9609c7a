"""The Beam pieces of `build_codes`: an entity index's entities read back, titles
tokenized, and the one step that resolves every entity's code on one worker (it holds
all entities' tokens: ~1 GB for the 6M catalog) and writes codes.parquet, the tokenizer
and the manifest's figures."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.codes.ald import TOKENIZER_FILE, CodeResult, WordPiece, hkc_codes, resolve
from transforms.codes.rq import rq_codes
from transforms.errors import UsageError
from transforms.formats.files import open_read, write_json
from transforms.run.progress import counter
from transforms.run.version import code_version
from transforms.schema import Entity
from transforms.stages.build_entity_index import EMBEDDINGS_FILE, ENTITIES_FILE


class ReadIndexEntities(beam.DoFn):
    """An entity index's `entities.parquet` -> Entity records in int_id order (the index
    already collapsed duplicate QIDs; int ids stay the index's)."""

    def process(self, path: str):
        read, ok = counter("catalog_rows_read"), counter("catalog_rows_ok")
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


def write_manifest(summary: dict, args, inputs) -> dict:
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
