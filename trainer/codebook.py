"""Entity codes and titles in compact arrays: qid -> code for training, code -> qid and the
prefix constraint for decoding.

Built from `pipelines.build_codes` output (`codes.parquet` + `tokenizer.json`). Everything is
a numpy array, not a Python dict, so that a 6M-entity catalog costs ~100 MB per process and
data-loader workers can hold it: QIDs of the form `Q<digits>` become int64 and are found by
binary search; codes are an (N, L) int32 matrix padded with EOS.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Optional

import numpy as np

from transforms.codes.ald import TOKENIZER_FILE
from transforms.errors import UsageError
from transforms.formats.files import open_read

CODES_FILE = "codes.parquet"
_QNUM = re.compile(r"^Q(\d{1,18})$")


def _qid_keys(qids: Sequence[str]) -> np.ndarray:
    """int64 keys when every QID is Q<digits>, else a unicode array (both sortable)."""
    nums = []
    for q in qids:
        m = _QNUM.match(q)
        if not m:
            return np.asarray(list(qids), dtype=str)
        nums.append(int(m.group(1)))
    return np.asarray(nums, dtype=np.int64)


class CodeBook:
    """qid <-> code (token ids up to and including the first EOS), plus titles."""

    def __init__(self, qids: Sequence[str], codes: np.ndarray, eos: int, titles: Optional[Sequence[str]] = None):
        self.eos = int(eos)
        self.qids = np.asarray(list(qids), dtype=object)
        self.codes = np.ascontiguousarray(codes, dtype=np.int32)
        if self.codes.ndim != 2 or len(self.codes) != len(self.qids):
            raise ValueError("codes must be an (N, L) matrix with one row per qid")
        # After the first EOS a code is padding: make it all EOS so prefixes are canonical.
        is_eos = self.codes == self.eos
        first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), self.codes.shape[1])
        cols = np.arange(self.codes.shape[1])[None, :]
        self.codes[cols > first[:, None]] = self.eos
        self.lengths = np.minimum(first + 1, self.codes.shape[1]).astype(np.int32)
        self.titles = None if titles is None else np.asarray(list(titles), dtype=object)
        keys = _qid_keys(self.qids)
        self._order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._order]
        self._numeric = keys.dtype == np.int64

    def __len__(self) -> int:
        return len(self.qids)

    @property
    def code_length(self) -> int:
        return int(self.codes.shape[1])

    def row_of(self, qid: str) -> int:
        """Row of a QID, -1 when it has no code."""
        if self._numeric:
            m = _QNUM.match(qid or "")
            if not m:
                return -1
            key = int(m.group(1))
        else:
            key = qid
        i = int(np.searchsorted(self._sorted_keys, key))
        if i < len(self._sorted_keys) and self._sorted_keys[i] == key:
            return int(self._order[i])
        return -1

    def code_of(self, qid: str) -> Optional[list[int]]:
        r = self.row_of(qid)
        if r < 0:
            return None
        return self.codes[r, : self.lengths[r]].tolist()

    def title_of_row(self, row: int) -> Optional[str]:
        return None if self.titles is None else self.titles[row]

    @classmethod
    def load(cls, codes_dir: str) -> CodeBook:
        import pyarrow.parquet as pq

        path = f"{codes_dir.rstrip('/')}/{CODES_FILE}"
        try:
            with open_read(path) as f:
                table = pq.read_table(f)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--codes: cannot read {path} ({e}); build it with python -m pipelines.build_codes") from e
        names = set(table.column_names)
        if not {"qid", "code"} <= names:
            raise UsageError(f"--codes: {path} lacks the qid / code columns of pipelines.build_codes output")
        code_lists = table["code"].to_pylist()
        length = max((len(c) for c in code_lists), default=0)
        tok = load_tokenizer(codes_dir)
        eos = eos_id(tok)
        matrix = np.full((len(code_lists), length), eos, dtype=np.int32)
        for i, c in enumerate(code_lists):
            matrix[i, : len(c)] = c
        titles = table["title"].to_pylist() if "title" in names else None
        return cls(table["qid"].to_pylist(), matrix, eos, titles)


def load_tokenizer(folder: str):
    """The `tokenizers.Tokenizer` saved beside codes or in a checkpoint."""
    from tokenizers import Tokenizer

    path = f"{folder.rstrip('/')}/{TOKENIZER_FILE}"
    try:
        with open_read(path) as f:
            return Tokenizer.from_str(f.read().decode("utf-8"))
    except Exception as e:  # noqa: BLE001
        raise UsageError(
            f"cannot read the tokenizer {path} ({e}): codes built before tokenizer.json was written must be rebuilt "
            "with python -m pipelines.build_codes"
        ) from e


def special_id(tok, *names: str) -> int:
    for n in names:
        i = tok.token_to_id(n)
        if i is not None:
            return int(i)
    raise UsageError(f"the tokenizer has none of the special tokens {names}")


def eos_id(tok) -> int:
    return special_id(tok, "[SEP]", "</s>")


def bos_id(tok) -> int:
    return special_id(tok, "[CLS]", "<s>")


def pad_id(tok) -> int:
    return special_id(tok, "[PAD]", "<pad>")


class PrefixIndex:
    """Valid token sequences (rows of an (N, L) matrix padded with EOS), sorted so that the
    rows sharing a prefix are one contiguous range: the next-token constraint of beam
    search, and exact lookup, by binary search per column. No per-node Python objects."""

    def __init__(self, rows: np.ndarray, eos: int):
        rows = np.ascontiguousarray(rows, dtype=np.int32)
        self.eos = int(eos)
        order = np.lexsort(rows.T[::-1]) if len(rows) else np.zeros(0, dtype=np.int64)
        self.rows = rows[order]
        self.index = order  # sorted position -> original row
        self.width = rows.shape[1] if rows.ndim == 2 else 0

    def _range(self, prefix: Sequence[int]) -> tuple[int, int]:
        lo, hi = 0, len(self.rows)
        for j, t in enumerate(prefix):
            if j >= self.width or lo >= hi:
                return lo, lo
            col = self.rows[lo:hi, j]
            a = int(np.searchsorted(col, t, side="left"))
            b = int(np.searchsorted(col, t, side="right"))
            lo, hi = lo + a, lo + b
        return lo, hi

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one index per process, lives as long
    def allowed(self, prefix: tuple[int, ...]) -> tuple[int, ...]:
        """Tokens that may follow `prefix`; (eos,) once a sequence is complete."""
        if prefix and prefix[-1] == self.eos:
            return (self.eos,)
        lo, hi = self._range(prefix)
        if lo >= hi:
            return ()
        j = len(prefix)
        if j >= self.width:
            return (self.eos,)
        return tuple(int(t) for t in np.unique(self.rows[lo:hi, j]))

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """Original rows whose sequence is exactly `tokens` (up to its first EOS)."""
        seq = list(tokens)
        if self.eos in seq:
            seq = seq[: seq.index(self.eos)]
        seq = seq + [self.eos] * (self.width - len(seq))
        if len(seq) > self.width:
            return []
        lo, hi = self._range(seq)
        return sorted(int(self.index[i]) for i in range(lo, hi))
