"""Grounding: map a free-text entity name to one catalog entity (QID).

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

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

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


class Grounder:
    """Title tables over a catalog, plus an optional embedding fallback.

    `entities` is a sequence of (int_id, qid, title) in catalog order. `encode` maps a list
    of strings to L2-normalised vectors and `index` is a faiss index over the titles' vectors
    (the entity index), both optional.
    """

    def __init__(self, entities: Sequence[tuple[int, str, str]], encode=None, index=None):
        self.by_exact: dict[str, list] = {}
        self.by_norm: dict[str, list] = {}
        self.by_base: dict[str, list] = {}
        self.by_id: dict[int, tuple[str, str]] = {}
        for int_id, qid, title in sorted(entities):
            entry = (int_id, qid, title)
            self.by_id[int_id] = (qid, title)
            self.by_exact.setdefault(title, []).append(entry)
            self.by_norm.setdefault(normalize_title(title), []).append(entry)
            base = normalize_title(strip_disambiguation(title))
            if base:
                self.by_base.setdefault(base, []).append(entry)
        self.encode = encode
        self.index = index

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
        if text in self.by_exact:
            return self._pick(self.by_exact[text], candidate_qid, "exact")
        norm = normalize_title(text)
        if norm in self.by_norm:
            return self._pick(self.by_norm[norm], candidate_qid, "normalized")
        base = normalize_title(strip_disambiguation(text))
        for key in (base, norm):
            if key and key in self.by_base:
                return self._pick(self.by_base[key], candidate_qid, "disambiguation")
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
                if e >= 0 and float(s) >= min_score:
                    qid, title = self.by_id[int(e)]
                    # Titles equal up to case etc. share one vector: treat them as one match.
                    twins = self.by_norm.get(normalize_title(title)) or [(int(e), qid, title)]
                    if not any(t[1] == qid for t in twins):
                        twins = [(int(e), qid, title)]
                    out[i] = self._pick(twins, items[i][1], "embedding", float(s))
        return [g if g is not None else Grounding(None, None, "ungrounded", 0.0) for g in out]
