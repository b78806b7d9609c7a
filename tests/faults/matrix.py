"""The fault matrix: one row per (fault, pipeline) a test injected.

`account` derives a row from what a run wrote: the keys a test put in (`planted`), the
keys in the output files, the keys of record-level rejects, and the files rejected as a
whole (a damaged archive: the records after the damage are unknowable to the run; they are
accounted for by the file's reject). lost = in - out - rejected; duplicated = keys written
more than once plus keys both written and rejected."""

from __future__ import annotations

from collections import Counter

MATRIX: list[dict] = []

# Faults the matrix does not inject yet, printed under it so that a reader sees the gaps.
NOT_COVERED = (
    "worker loss at start-up: an SDK worker killed about a second after it started (before its first bundle) "
    "left Beam's multi-process runner waiting for over 5 minutes; a worker killed while the job writes is covered",
)


def _same_file(path: str, source: str) -> bool:
    """A reject's source is the file, or `<file>#rgN` for a Parquet row group."""
    return source == path or source.startswith(path + "#rg")


def account(fault: str, pipeline: str, planted: dict[str, str], out_keys: list[str], rejects: list[dict]) -> dict:
    """`planted`: key -> the file it was written to; empty for a file-level fault (a
    zero-byte file), whose row shows the reasons of the `rejects` given."""
    out = Counter(k for k in out_keys if k in planted)
    rejected_keys = Counter(r["key"] for r in rejects if r.get("key") in planted)
    unaccounted = [k for k in planted if k not in out and k not in rejected_keys]
    # Rejects without a key speak for records of their file: `count` of them (a column
    # missing from a row group), or all the rest (count 0: a file cut short or unreadable).
    covered: set = set()
    keyless = [r for r in rejects if not r.get("key") and r.get("source")]
    for r in sorted(keyless, key=lambda r: r.get("count", 1) == 0):
        left = [k for k in unaccounted if k not in covered and _same_file(planted[k], r["source"])]
        covered |= set(left if r.get("count", 1) == 0 else left[: r.get("count", 1)])
    lost = [k for k in unaccounted if k not in covered]
    duplicated = sum(n - 1 for n in out.values() if n > 1) + sum(1 for k in out if k in rejected_keys)
    row = {
        "fault": fault,
        "pipeline": pipeline,
        "in": len(planted),
        "out": sum(out.values()),
        "rejected": len(rejected_keys) + len(covered),
        "lost": len(lost),
        "duplicated": duplicated,
        "reasons": sorted(
            {
                r["reason"]
                for r in rejects
                if not planted
                or r.get("key") in planted
                or (not r.get("key") and any(_same_file(f, r.get("source") or "") for f in set(planted.values())) and covered)
            }
        ),
    }
    MATRIX.append(row)
    return row


def account_counts(fault: str, pipeline: str, n_in: int, n_out: int, rejected: list[dict], duplicated: int = 0) -> dict:
    """A row from counts, for records without a key of their own (catalog lines): the
    rejects' `count` fields say how many records each stands for."""
    n_rejected = sum(r.get("count", 1) for r in rejected)
    row = {
        "fault": fault,
        "pipeline": pipeline,
        "in": n_in,
        "out": n_out,
        "rejected": n_rejected,
        "lost": n_in - n_out - n_rejected,
        "duplicated": duplicated,
        "reasons": sorted({r["reason"] for r in rejected}),
    }
    MATRIX.append(row)
    return row


def format_matrix() -> str:
    cols = ("fault", "pipeline", "in", "out", "rejected", "lost", "duplicated")
    rows = sorted(MATRIX, key=lambda r: (r["pipeline"], r["fault"]))
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) if i < 2 else c.rjust(widths[c]) for i, c in enumerate(cols)) + "  reasons"]
    for r in rows:
        cells = [str(r[c]).ljust(widths[c]) if i < 2 else str(r[c]).rjust(widths[c]) for i, c in enumerate(cols)]
        lines.append("  ".join(cells) + "  " + ",".join(r["reasons"]))
    return "\n".join(lines)


def format_not_covered() -> str:
    return "not covered yet:\n" + "\n".join(f"  - {x}" for x in NOT_COVERED)
