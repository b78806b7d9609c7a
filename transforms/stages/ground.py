"""Grounding: map a free-text entity name to one catalog entity (QID); `GroundingHandler`
runs it in `RunInference` (refine's corrected names, the `ground` command).

In order:
  1. exact title                                  method "exact"          score 1.0
  2. normalised title: case, underscores, whitespace, punctuation, accents (NFKD without
     combining marks), "&" / "and"                method "normalized"     score 1.0
  3. the same without a trailing disambiguation ("Mercury (planet)" <-> "Mercury"), on
     either side                                  method "disambiguation" score 1.0
  4. nearest title in the entity index (same text encoder), if cosine >= min_score
                                                  method "embedding"      score = cosine
  5. otherwise                                    method "ungrounded"     qid None
When several QIDs share the matching title, the candidate's QID wins if it is among them,
else the first in catalog order; the others are recorded in `ambiguous`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import ModelHandler

from transforms.formats import safe_json
from transforms.formats.files import open_read
from transforms.models.embedding import load_sentence_transformer
from transforms.models.faiss_index import load_faiss_index
from transforms.models.text_encoder import index_encoder
from transforms.run.progress import counter
from transforms.schema import Reject
from transforms.stages.build_entity_index import ENTITIES_FILE, INDEX_FILE, read_manifest

_DISAMBIGUATION = re.compile(r"\s*\([^()]*\)\s*$")


def normalize_title(text: str) -> str:
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.replace("_", " ").replace("&", " and ")
    text = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in text)
    return " ".join(text.casefold().split())


def strip_disambiguation(title: str) -> str:
    return _DISAMBIGUATION.sub("", title or "").strip()


@dataclass
class Grounding:
    qid: Optional[str]
    title: Optional[str]
    method: str
    score: float
    ambiguous: list[str] = field(default_factory=list)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _exact_key(title: str) -> str:
    return title


def _base_key(title: str) -> str:
    return normalize_title(strip_disambiguation(title))


_KEYS = {"exact": _exact_key, "norm": normalize_title, "base": _base_key}


class _HashIndex:
    """key -> catalog positions, as two sorted arrays (64-bit key hash, position): 12 bytes
    an entity instead of a Python dict entry with its string (~150 bytes). A hash match is
    confirmed by recomputing the key from the stored title, so collisions cost nothing."""

    def __init__(self, keys: list[str]):
        hashes = np.fromiter((_hash64(k) if k else 0 for k in keys), dtype=np.uint64, count=len(keys))
        positions = np.arange(len(keys), dtype=np.int32)
        present = np.fromiter((bool(k) for k in keys), dtype=bool, count=len(keys))
        hashes, positions = hashes[present], positions[present]
        order = np.lexsort((positions, hashes))
        self.hashes = hashes[order]
        self.positions = positions[order]

    def candidates(self, key: str) -> np.ndarray:
        h = np.uint64(_hash64(key))
        lo = int(np.searchsorted(self.hashes, h, side="left"))
        hi = int(np.searchsorted(self.hashes, h, side="right"))
        return self.positions[lo:hi]

    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.positions.nbytes)


class Grounder:
    """Title tables over a catalog, plus an optional embedding fallback.

    `entities` is a sequence of (int_id, qid, title) in catalog order. `encode` maps a list
    of strings to L2-normalised vectors and `index` is a faiss index over the titles' vectors
    (the entity index), both optional.

    The tables are compact: titles and QIDs in two Arrow string arrays, int ids in a numpy
    array, and one sorted hash index per kind of match (exact, normalised, without
    disambiguation). At 6M entities that is ~0.5 GB, not the ~5 GB of dicts of Python
    strings it replaces; one copy per machine when the handler shares it.
    """

    def __init__(self, entities: Sequence[tuple[int, str, str]], encode=None, index=None):

        rows = sorted(entities)
        self._set_tables(
            np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
            pa.array([r[1] for r in rows], pa.string()),
            pa.array([r[2] for r in rows], pa.string()),
        )
        self.encode = encode
        self.index = index

    @classmethod
    def from_table(cls, table, encode=None, index=None) -> Grounder:
        """From an Arrow table with int_id, qid, title (the entity index's entities.parquet),
        without a Python object per entity."""

        table = table.take(pc.sort_indices(table, [("int_id", "ascending")]))
        self = cls.__new__(cls)
        self._set_tables(
            table["int_id"].to_numpy().astype(np.int64),
            pa.concat_arrays(table["qid"].chunks) if table.num_rows else pa.array([], pa.string()),
            pa.concat_arrays(table["title"].chunks) if table.num_rows else pa.array([], pa.string()),
        )
        self.encode = encode
        self.index = index
        return self

    def _set_tables(self, int_ids, qids, titles) -> None:
        self.int_ids = int_ids
        self.qids = qids
        self.titles = titles
        self.tables = {}
        for kind, fn in _KEYS.items():
            # One kind at a time: the Python strings of one pass are freed before the next.
            self.tables[kind] = _HashIndex([fn(t) for t in titles.to_pylist()])

    def nbytes(self) -> int:
        """Memory held by the title tables (the faiss index and encoder not included)."""
        return int(self.int_ids.nbytes + self.qids.nbytes + self.titles.nbytes + sum(t.nbytes() for t in self.tables.values()))

    def _entry(self, pos: int) -> tuple[int, str, str]:
        return int(self.int_ids[pos]), self.qids[pos].as_py(), self.titles[pos].as_py()

    def _lookup(self, kind: str, key: str) -> list[tuple[int, str, str]]:
        fn = _KEYS[kind]
        found = []
        for pos in sorted(int(p) for p in self.tables[kind].candidates(key)):
            entry = self._entry(pos)
            if fn(entry[2]) == key:
                found.append(entry)
        return found

    def _by_id(self, int_id: int) -> Optional[tuple[int, str, str]]:
        pos = int(np.searchsorted(self.int_ids, int_id))
        if pos < len(self.int_ids) and int(self.int_ids[pos]) == int_id:
            return self._entry(pos)
        return None

    @staticmethod
    def _pick(entries, candidate_qid: Optional[str], method: str, score: float = 1.0) -> Grounding:
        chosen = next((e for e in entries if e[1] == candidate_qid), entries[0])
        others = [e[1] for e in entries if e[1] != chosen[1]]
        return Grounding(chosen[1], chosen[2], method, score, others)

    def ground_text(self, text: str, candidate_qid: Optional[str] = None) -> Optional[Grounding]:
        """Steps 1-3 (no model needed); None when no title matches."""
        text = (text or "").strip()
        if not text:
            return Grounding(None, None, "ungrounded", 0.0)
        found = self._lookup("exact", text)
        if found:
            return self._pick(found, candidate_qid, "exact")
        norm = normalize_title(text)
        found = self._lookup("norm", norm) if norm else []
        if found:
            return self._pick(found, candidate_qid, "normalized")
        base = normalize_title(strip_disambiguation(text))
        for key in (base, norm):
            found = self._lookup("base", key) if key else []
            if found:
                return self._pick(found, candidate_qid, "disambiguation")
        return None

    def ground_many(
        self, items: Sequence[tuple[str, Optional[str]]], min_score: float
    ) -> list[Grounding]:
        """Ground (text, candidate qid) pairs; the unmatched ones share one encoder call."""
        out: list[Optional[Grounding]] = [self.ground_text(t, c) for t, c in items]
        todo = [i for i, g in enumerate(out) if g is None]
        if todo and self.encode is not None and self.index is not None:
            vectors = np.asarray(self.encode([items[i][0] for i in todo]), dtype=np.float32)
            scores, ids = self.index.search(vectors, 1)
            for i, s, e in zip(todo, scores[:, 0], ids[:, 0]):
                if e < 0 or float(s) < min_score:
                    continue
                hit = self._by_id(int(e))
                if hit is None:
                    continue
                # Titles equal up to case etc. share one vector: treat them as one match.
                twins = self._lookup("norm", normalize_title(hit[2])) or [hit]
                if not any(t[1] == hit[1] for t in twins):
                    twins = [hit]
                out[i] = self._pick(twins, items[i][1], "embedding", float(s))
        return [g if g is not None else Grounding(None, None, "ungrounded", 0.0) for g in out]


def json_item(element) -> tuple:
    """{"text": ..., "candidate_qid"?: ...} -> (text, candidate qid)."""
    return str(element.get("text") or ""), element.get("candidate_qid") or element.get("qid")


class GroundingHandler(ModelHandler[object, Grounding, Grounder]):
    """element -> (element, Grounding) against the entity index (titles, then embeddings).
    `item_fn` picks (name, candidate qid) out of an element."""

    def __init__(
        self,
        entity_index: str,
        text_model: str,
        min_score: float,
        threads=0,
        item_fn=json_item,
        share_across_processes: bool = False,
    ):
        # Shared: the title tables, the faiss index and the encoder are held once per
        # machine and every SDK process calls into them.
        super().__init__(min_batch_size=1, max_batch_size=256, large_model=share_across_processes)
        self.entity_index = entity_index.rstrip("/")
        self.text_model = text_model
        self.min_score = min_score
        self.threads = threads
        self.item_fn = item_fn

    def load_model(self) -> Grounder:
        return load_grounder(self.entity_index, self.text_model, self.threads)

    def run_inference(self, batch, model: Grounder, inference_args=None):
        items = [self.item_fn(e) for e in batch]
        yield from zip(batch, model.ground_many(items, self.min_score))

    def get_metrics_namespace(self) -> str:
        return "grounding"


def load_grounder(entity_index: str, text_model: Optional[str] = None, threads=0) -> Grounder:
    manifest = read_manifest(entity_index)
    with open_read(f"{entity_index}/{ENTITIES_FILE}") as f:
        table = pq.read_table(f, columns=["int_id", "qid", "title"])
    model = load_sentence_transformer(text_model or index_encoder(manifest, entity_index), threads=threads)
    index = load_faiss_index(f"{entity_index}/{INDEX_FILE}", threads, params=manifest.get("search", {}).get("params", {}))

    def encode(texts):
        return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    return Grounder.from_table(table, encode, index)


def parse_line(line: str):
    """A line of the `ground` command's input -> its object, or a reject (bad JSON, no 'text')."""
    counter("names_read").inc()
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
    """(object, Grounding) -> the output line: the object plus the grounding's fields."""
    obj, g = element
    counter(f"grounded_{g.method}").inc()
    out = {**obj, "qid": g.qid, "title": g.title, "method": g.method, "score": round(float(g.score), 6), "ambiguous": g.ambiguous}
    return json.dumps(out, ensure_ascii=False)
