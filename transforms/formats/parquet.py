"""Parquet files (LAION metadata, img2dataset's parquet output, our shards): row-group
units, row reads of chosen columns, and image reads by row."""

from __future__ import annotations

from typing import Optional

PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def open_parquet(fileobj):
    import pyarrow.parquet as pq

    return pq.ParquetFile(fileobj)


def row_group_count(fileobj) -> int:
    """Row groups of a Parquet file (0 for a file without rows)."""
    return open_parquet(fileobj).metadata.num_row_groups


def row_group_units(path: str, fileobj, *, visit_empty: bool = True) -> list[tuple[str, int]]:
    """(path, row group) read units. A file without row groups gives one unit when
    `visit_empty` (so a reader still looks at its columns and can say what is wrong), none
    otherwise (a training stream must not count an empty unit as a reader's share)."""
    n = row_group_count(fileobj)
    return [(path, rg) for rg in range(max(n, 1) if visit_empty else n)]


def first_present(names, candidates) -> Optional[str]:
    """The first candidate column that exists, matched exactly, then case-insensitively."""
    names = list(names)
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c is None:
            continue
        if c in names:
            return c
        if c.lower() in lower:
            return lower[c.lower()]
    return None


def read_rows(fileobj, rg: int, columns: Optional[list[str]] = None, exclude: tuple[str, ...] = ()) -> list[dict]:
    """Rows of one row group as dicts, with `columns` (None: all) minus `exclude`; [] for a
    row group the file does not have (an empty file)."""
    pf = open_parquet(fileobj)
    if rg >= pf.metadata.num_row_groups:
        return []
    names = pf.schema_arrow.names
    cols = [c for c in (names if columns is None else columns) if c in names and c not in exclude]
    return pf.read_row_group(rg, columns=cols).to_pylist()


def read_images(fileobj, rows_by_rg: dict[int, list[int]], image_col: Optional[str]):
    """({(rg, row): bytes}, {(rg, row): why there is none}) reading only the image column
    of the row groups that hold the rows asked for."""
    pf = open_parquet(fileobj)
    col = first_present(pf.schema_arrow.names, [image_col])
    images, missing = {}, {}
    for rg, rows in sorted(rows_by_rg.items()):
        if col is None or rg >= pf.metadata.num_row_groups:
            why = f"no image column {image_col!r}" if col is None else "no such row group"
            for row in rows:
                missing[(rg, row)] = why
            continue
        column = pf.read_row_group(rg, columns=[col]).column(0)
        for row in rows:
            value = column[row].as_py() if row < len(column) else None
            if value is None:
                missing[(rg, row)] = "null image" if row < len(column) else "no such row"
            else:
                images[(rg, row)] = bytes(value)
    return images, missing
