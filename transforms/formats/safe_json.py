"""JSON from untrusted bytes: every corpus metadata member, catalog line and LLM answer is
parsed here, so a hostile document is a data error (a reject), never a crash.

`json.loads` of `[` x 100,000 raises `RecursionError`, which is not a `ValueError`: a
reader that catches `ValueError` would let it through and treat it as an error of the
environment (retried, then fatal). `loads` turns it into `JSONError` (a `ValueError`), and
refuses documents nested deeper than `max_depth` (objects in real metadata and answers are
a few levels deep), or longer than `max_bytes` before parsing a byte.
"""

from __future__ import annotations

import json
from typing import Any, Optional

# Nesting deeper than this is refused: metadata, catalog rows and LLM answers are at most
# a few levels deep; the parser itself would stop near Python's recursion limit (~1000).
MAX_DEPTH = 64


class JSONError(ValueError):
    """Bytes that are not acceptable JSON; `reason` is a stable reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed value (a scalar is 0, `[]` is 1), counted iteratively and
    only up to `limit + 1`."""
    deepest = 0
    todo = [(obj, 0)]
    while todo:
        value, d = todo.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        d += 1
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        todo.extend((c, d) for c in children)
    return deepest


def loads(data, *, max_depth: int = MAX_DEPTH, max_bytes: Optional[int] = None) -> Any:
    """`json.loads` for untrusted text or UTF-8 bytes. Raises `JSONError` (a ValueError) for
    anything unacceptable: too long (checked before decoding), not UTF-8, not JSON, nested
    deeper than `max_depth`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise JSONError("json_too_large", f"{len(data):,} bytes > {max_bytes:,}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError("bad_utf8", str(e)[:200]) from None
    try:
        obj = json.loads(data)
    except RecursionError:
        raise JSONError("json_too_deep", f"nested deeper than the parser allows (> {max_depth} levels)") from None
    except ValueError as e:
        raise JSONError("bad_json", str(e)[:200]) from None
    if depth(obj, max_depth) > max_depth:
        raise JSONError("json_too_deep", f"nested more than {max_depth} levels")
    return obj


def raw_decode_all(text: str, *, max_depth: int = MAX_DEPTH) -> list:
    """Every top-level JSON object (`{...}`) that parses in `text`, left to right, none
    inside another: how the LLM-answer parser counts the objects an answer holds."""
    decoder = json.JSONDecoder()
    found, i = [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            obj, end = decoder.raw_decode(text, i)
        except RecursionError:
            i += 1
            continue
        except ValueError:
            i += 1
            continue
        if depth(obj, max_depth) <= max_depth:
            found.append(obj)
        i = end
