"""Entity codes for generative entity recognition (GER): ALD and its baselines.

ALD (GER, sec. 3.2 and its public code), code length L:
  * tokenize every (lower-cased) title with a BERT WordPiece tokenizer and count every token
    over the whole catalog;
  * an entity's code is its L-1 rarest distinct name tokens, rarest first (ties: smaller token
    id), then EOS; short names are padded with EOS;
  * collisions: entities are visited in a seeded random order (a hash of seed and QID, so the
    order does not depend on how the input was split); the first keeps its code; a later one
    writes its next-rarest unused name token into the slot right after its last real token,
    trying them one after another until the code is unique; then random tokens in that slot.
    As GER publishes it (`collision_rule="published"`), when all L-1 slots before EOS are
    taken that slot is the EOS slot: the disambiguated code is L real tokens without EOS (the
    decoder stops at L tokens). `collision_rule="keep_eos"` (this project's earlier rule)
    overwrites the last real token instead and keeps the EOS, which leaves one slot fewer
    and falls back to random tokens more often. The share of random fallbacks is reported.
Baselines: `caption` (the first L-1 name tokens, then EOS; collisions resolved the same way),
`atomic` (L-1 random tokens, then EOS, unique) and `hkc` (hierarchical k-means over the
entity-index embeddings: L-2 levels of k-means with k = ceil(N ** (1 / (L-1))) clusters,
then the entity's position inside its leaf cluster; each level's index is mapped to a
vocabulary token; then EOS). `rq` (IRGen's residual quantization of the same embeddings)
is in transforms/codes/rq.py.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

STRATEGIES = ("ald", "caption", "atomic", "hkc", "rq")
COLLISION_RULES = ("published", "keep_eos")
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class CodeResult:
    qid: str
    int_id: int
    code: list[int]
    method: str  # initial | next_rarest | random
    n_name_tokens: int
    notes: list[str] = field(default_factory=list)


def visit_order_key(seed: int, qid: str) -> bytes:
    return hashlib.sha256(f"{seed}:{qid}".encode()).digest()


def rarest_first(tokens: Sequence[int], counts: dict[int, int]) -> list[int]:
    """Distinct tokens of a name, rarest first; ties by token id."""
    return sorted(set(tokens), key=lambda t: (counts.get(t, 0), t))


def initial_code(tokens: Sequence[int], counts: dict[int, int], strategy: str, length: int, eos: int) -> tuple[list[int], list[int]]:
    """(code, the remaining candidate tokens for collision resolution, in preference order)."""
    if strategy == "ald":
        ranked = rarest_first(tokens, counts)
    elif strategy == "caption":
        ranked = list(dict.fromkeys(tokens))  # name order, distinct
    else:
        raise ValueError(f"initial_code does not handle {strategy!r}")
    head, rest = ranked[: length - 1], ranked[length - 1 :]
    return head + [eos] * (length - len(head)), rest


def resolve(
    entities: Iterable[tuple[str, int, list[int]]],
    counts: dict[int, int],
    *,
    strategy: str,
    length: int,
    eos: int,
    vocab_ids: Sequence[int],
    seed: int,
    max_random_tries: int = 1000,
    collision_rule: str = "published",
) -> list[CodeResult]:
    """Globally unique codes for (qid, int_id, name token ids), deterministic for a seed."""
    if length < 2:
        raise ValueError("code length must be >= 2 (at least one token and EOS)")
    if collision_rule not in COLLISION_RULES:
        raise ValueError(f"collision_rule must be one of {COLLISION_RULES}, got {collision_rule!r}")
    last_slot = length - 1 if collision_rule == "published" else length - 2
    ordered = sorted(entities, key=lambda e: visit_order_key(seed, e[0]))
    used: set[tuple[int, ...]] = set()
    out: list[CodeResult] = []
    for qid, int_id, tokens in ordered:
        rng = random.Random(visit_order_key(seed, qid))
        if strategy == "atomic":
            for _ in range(max_random_tries):
                code = [rng.choice(vocab_ids) for _ in range(length - 1)] + [eos]
                if tuple(code) not in used:
                    break
            else:
                raise RuntimeError(f"no unique atomic code for {qid} after {max_random_tries} tries")
            used.add(tuple(code))
            out.append(CodeResult(qid, int_id, code, "random", len(set(tokens))))
            continue
        code, rest = initial_code(tokens, counts, strategy, length, eos)
        method = "initial"
        if tuple(code) in used:
            real = sum(1 for t in code[: length - 1] if t != eos)
            # Right after the last real token; with the published rule that may be the EOS slot.
            slot = min(real, last_slot)
            found = False
            for t in rest:
                trial = code[:slot] + [t] + code[slot + 1 :]
                if tuple(trial) not in used:
                    code, method, found = trial, "next_rarest", True
                    break
            if not found:
                for _ in range(max_random_tries):
                    t = rng.choice(vocab_ids)
                    if t in code:
                        continue  # a random token that repeats one of the code's is no new information
                    trial = code[:slot] + [t] + code[slot + 1 :]
                    if tuple(trial) not in used:
                        code, method, found = trial, "random", True
                        break
            if not found:
                raise RuntimeError(f"no unique code for {qid}: raise --code_length")
        used.add(tuple(code))
        out.append(CodeResult(qid, int_id, code, method, len(set(tokens))))
    out.sort(key=lambda r: r.int_id)
    return out


@dataclass
class WordPiece:
    """A BERT WordPiece tokenizer from a vocab.txt, a tokenizer.json, a local folder or a
    Hugging Face id (e.g. bert-base-uncased on machines that reach the hub). Titles are
    lower-cased, special tokens are not added."""

    name: str
    _tok: Optional[object] = None

    SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "<pad>", "<unk>", "<mask>")

    def load(self):
        if self._tok is None:
            import os

            if os.path.isfile(self.name) and self.name.endswith(".txt"):
                from tokenizers import BertWordPieceTokenizer

                self._tok = BertWordPieceTokenizer(self.name, lowercase=True)
            elif os.path.isfile(self.name) and self.name.endswith(".json"):
                from tokenizers import Tokenizer

                self._tok = Tokenizer.from_file(self.name)
            else:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.name).backend_tokenizer
        return self._tok

    def to_json(self) -> str:
        """The tokenizer as a `tokenizers` JSON document (loadable with Tokenizer.from_str)."""
        tok = self.load()
        tok = getattr(tok, "_tokenizer", tok)  # BertWordPieceTokenizer wraps a Tokenizer
        return tok.to_str()

    def encode(self, title: str) -> list[int]:
        return list(self.load().encode(title.lower(), add_special_tokens=False).ids)

    @property
    def eos_id(self) -> int:
        tok = self.load()
        for t in ("[SEP]", "</s>"):
            i = tok.token_to_id(t)
            if i is not None:
                return i
        raise ValueError(f"tokenizer {self.name!r} has neither [SEP] nor </s> for EOS")

    def regular_ids(self) -> list[int]:
        tok = self.load()
        out = []
        for i in range(tok.get_vocab_size()):
            t = tok.id_to_token(i)
            if t is not None and t not in self.SPECIAL and not t.startswith("[unused"):
                out.append(i)
        return out


def hkc_codes(vectors, ids: Sequence[int], *, length: int, eos: int, vocab_ids: Sequence[int], seed: int) -> dict[int, list[int]]:
    """int id -> hierarchical k-means code (see the module docstring)."""
    import math

    import faiss
    import numpy as np

    n = len(ids)
    levels = length - 1
    k = max(2, math.ceil(n ** (1.0 / levels)))
    if k > len(vocab_ids):
        raise RuntimeError(f"hkc needs {k} tokens per level but the vocabulary has {len(vocab_ids)}: raise --code_length")
    codes: dict[int, list[int]] = {}

    def split(members: np.ndarray, prefix: list[int], depth: int):
        if depth == levels - 1 or len(members) <= k:
            order = sorted(members.tolist(), key=lambda m: ids[m])
            if len(order) > len(vocab_ids):
                raise RuntimeError(f"a leaf cluster of {len(order)} entities exceeds the vocabulary: raise --code_length")
            for pos, m in enumerate(order):
                code = prefix + [vocab_ids[pos]]
                codes[ids[m]] = code + [eos] * (length - len(code))
            return
        x = np.ascontiguousarray(vectors[members], dtype=np.float32)
        km = faiss.Kmeans(x.shape[1], min(k, len(members)), niter=20, seed=seed + depth, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        assign = assign[:, 0]
        for c in range(int(assign.max()) + 1):
            sub = members[assign == c]
            if len(sub):
                split(sub, prefix + [vocab_ids[c]], depth + 1)

    split(np.arange(n), [], 0)
    return codes
