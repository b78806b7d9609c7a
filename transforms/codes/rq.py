"""IRGen-style entity codes: residual quantization of the entity index's embeddings.

A code is M levels of K = 2^bits centroids (residual vector quantization, each level's
codebook trained with faiss k-means, see `RQCoder`: level 1 quantizes the vector, each
later level the residual the earlier ones left, so every prefix of a code is itself a
coarser code of the same vector), then EOS. Level m's centroid c is the token
`vocab_ids[m * K + c]`: each level has its own tokens, so a token says which level it is.
With M = code_length - 1 the codes fit `trainer.train` / `trainer.predict` unchanged
(fixed length, EOS last, prefix-constrained beam search over the code table).

Two entities can fall into the same cell. Collisions are resolved like ALD's: entities are
visited in a seeded order (a hash of seed and QID), the first keeps its code, a later one
takes the nearest still-unused centroid of the last level for its own last-level residual
(`next_nearest`: the code still describes the vector, one step coarser), and only when the
`ALTERNATIVES` (32) nearest are all taken a random unused last-level (then last-two-level)
index (`random`; the share is reported). A first-level cell holding more entities than K
cannot avoid random codes: use more levels or bits for a dense catalog.

At 6M entities x 384 dims the embeddings are 9.2 GB: they are read in chunks, twice (a
seeded sample to train on, then every row to encode), and what stays is the codes and
the alternatives, (M + ALTERNATIVES) small ints per entity (~150 MB).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np

from transforms.codes.ald import CodeResult, visit_order_key

log = logging.getLogger(__name__)

ALTERNATIVES = 32
CHUNK_ROWS = 65_536


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of a .npy stream, leaving it at the first data byte."""
    fmt = np.lib.format
    major, _ = fmt.read_magic(f)
    return fmt.read_array_header_1_0(f) if major == 1 else fmt.read_array_header_2_0(f)


def npy_chunks(f, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 rows) of a 2-D .npy file read from a stream, chunk by chunk."""
    shape, fortran, dtype = npy_header(f)
    if fortran or len(shape) != 2:
        raise ValueError(f"expected a C-ordered 2-D array, got shape {shape} (fortran order: {fortran})")
    n, d = shape
    row_bytes = d * dtype.itemsize
    start = 0
    while start < n:
        rows = min(chunk_rows, n - start)
        buf = f.read(rows * row_bytes)
        if len(buf) != rows * row_bytes:
            raise ValueError(f"embeddings file ends at row {start + len(buf) // row_bytes} of {n}")
        yield start, np.frombuffer(buf, dtype=dtype).reshape(rows, d).astype(np.float32, copy=False)
        start += rows


def effective_bits(n: int, bits: int, levels: int) -> int:
    """K = 2^bits centroids need ~39 K training vectors (faiss's k-means advice); a smaller
    catalog gets fewer bits per level, but never so few that the K^levels codes cannot
    hold twice the catalog."""
    fit = int(math.floor(math.log2(max(2, n // 39))))
    room = int(math.ceil(math.log2(max(2, 2 * n)) / levels))
    return max(1, min(bits, max(fit, room)))


class RQCoder:
    """Residual vector quantization trained level by level with faiss k-means: level 1
    clusters the vectors, level m the residuals levels 1..m-1 left; a vector's code is its
    nearest centroid at each level in turn. Encodes chunks into codes (N, M) and, for
    collisions, the last level's centroids nearest to the vector's last residual.

    faiss's own `ResidualQuantizer` was tried first: on 3,000 clustered unit vectors
    (2 levels of 64) its trained codebooks used 25 of the 64 last-level centroids and gave
    301 distinct codes, where level-wise k-means gives ~1,900 (tests/test_codes.py builds
    that data); fewer distinct codes means more collisions to resolve by hand.
    """

    def __init__(self, dim: int, levels: int, bits: int, seed: int = 0, niter: int = 25):
        self.dim, self.levels, self.bits, self.k = dim, levels, bits, 1 << bits
        self.seed, self.niter = seed, niter
        self.codebooks = np.zeros((levels, self.k, dim), dtype=np.float32)
        self._indexes = []

    def train(self, sample: np.ndarray) -> None:
        import faiss

        residual = np.ascontiguousarray(sample, dtype=np.float32).copy()
        for m in range(self.levels):
            km = faiss.Kmeans(self.dim, self.k, niter=self.niter, seed=self.seed + m, verbose=False,
                              max_points_per_centroid=max(256, len(residual) // self.k + 1))
            km.train(residual)
            self.codebooks[m] = km.centroids
            index = faiss.IndexFlatL2(self.dim)
            index.add(self.codebooks[m])
            self._indexes.append(index)
            _, a = index.search(residual, 1)
            residual -= self.codebooks[m][a[:, 0]]

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        residual = np.ascontiguousarray(x, dtype=np.float32).copy()
        codes = np.zeros((len(x), self.levels), dtype=np.int32)
        a_count = min(ALTERNATIVES, self.k)
        alts = None
        for m, index in enumerate(self._indexes):
            if m == self.levels - 1:
                _, near = index.search(residual, a_count)
                alts = near.astype(np.int32)
                codes[:, m] = alts[:, 0]
            else:
                _, near = index.search(residual, 1)
                codes[:, m] = near[:, 0]
            residual -= self.codebooks[m][codes[:, m]]
        return codes, alts


def rq_codes(
    items: Sequence[tuple[str, int, int]],
    open_embeddings,
    *,
    levels: int,
    bits: int,
    eos: int,
    vocab_ids: Sequence[int],
    seed: int,
    train_size: int = 1_000_000,
    max_random_tries: int = 10_000,
) -> tuple[list[CodeResult], dict]:
    """items = (qid, int_id, embedding row); `open_embeddings()` opens the index's
    embeddings.npy (called twice: sample, then encode). Returns the codes and a summary."""
    with open_embeddings() as f:
        (n_rows, dim), _, _ = npy_header(f)
    n = len(items)
    bits_used = effective_bits(n, bits, levels)
    if bits_used < bits:
        log.warning("rq: %d entities are too few to train %d centroids per level (faiss wants ~39 per centroid): "
                    "using %d bits per level", n, 1 << bits, bits_used)
    k = 1 << bits_used
    if levels * k > len(vocab_ids):
        raise RuntimeError(f"rq needs {levels} x {k} = {levels * k} tokens but the vocabulary has {len(vocab_ids)}: "
                           "lower --rq_bits or --code_length")
    wanted = np.array(sorted({row for _, _, row in items}), dtype=np.int64)
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(wanted, size=min(train_size, len(wanted)), replace=False))
    sample = []
    with open_embeddings() as f:
        for start, chunk in npy_chunks(f):
            lo, hi = np.searchsorted(take, [start, start + len(chunk)])
            if hi > lo:
                sample.append(chunk[take[lo:hi] - start])
    coder = RQCoder(dim, levels, bits_used, seed=seed)
    coder.train(np.concatenate(sample))
    small = np.int16 if k <= 32768 else np.int32
    codes = np.zeros((n_rows, levels), dtype=small)
    alts = np.zeros((n_rows, min(ALTERNATIVES, k)), dtype=small)
    with open_embeddings() as f:
        for start, chunk in npy_chunks(f):
            lo, hi = np.searchsorted(wanted, [start, start + len(chunk)])
            if hi > lo:
                rows = wanted[lo:hi]
                c, a = coder.encode(chunk[rows - start])
                codes[rows], alts[rows] = c, a
    used: set[tuple[int, ...]] = set()
    results = []
    for qid, int_id, row in sorted(items, key=lambda it: visit_order_key(seed, it[0])):
        code = tuple(int(c) for c in codes[row])
        method = "initial"
        if code in used:
            method = ""
            for c in alts[row]:
                trial = code[:-1] + (int(c),)
                if trial not in used:
                    code, method = trial, "next_nearest"
                    break
            if not method:
                r = random.Random(visit_order_key(seed, qid))
                tail = 1 if levels == 1 else 2
                for attempt in range(max_random_tries):
                    width = 1 if attempt < max_random_tries // 2 else tail
                    trial = code[: levels - width] + tuple(r.randrange(k) for _ in range(width))
                    if trial not in used:
                        code, method = trial, "random"
                        break
            if not method:
                raise RuntimeError(f"no unique rq code for {qid}: raise --code_length or --rq_bits")
        used.add(code)
        tokens = [int(vocab_ids[m * k + c]) for m, c in enumerate(code)] + [eos]
        results.append(CodeResult(qid, int_id, tokens, "rq" if method == "initial" else method, levels))
    results.sort(key=lambda r: r.int_id)
    # How well the codes describe the vectors: mean squared reconstruction error per level
    # (each prefix is a coarser code), on the training sample.
    sample = np.concatenate(sample)[:20_000]
    c, _ = coder.encode(sample)
    recon = np.zeros_like(sample)
    errors = []
    for m in range(levels):
        recon += coder.codebooks[m][c[:, m]]
        errors.append(round(float(((sample - recon) ** 2).sum(1).mean()), 6))
    summary = {"levels": levels, "bits": bits, "bits_used": bits_used, "centroids_per_level": k,
               "train_vectors": int(len(take)), "mse_by_prefix": errors,
               "library": "residual k-means, one faiss.Kmeans per level, greedy encoding"}
    return results, summary
