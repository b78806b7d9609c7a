"""Image identity and the names of record sources.

An image's key is `<file tag>/<corpus key>`: a corpus key (img2dataset's `key`, a key
column) is unique only within its file, so it is qualified by the file's path below the
input root. Every pass over a corpus (captions, images, decontamination, refinement)
derives keys with `image_identity`, so they agree.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional


def url_key(url: str) -> str:
    """Image identity for corpora without keys: the same URL is the same image."""
    return hashlib.sha1(url.encode("utf-8", "surrogatepass")).hexdigest()[:20]


_GLOB_CHARS = "*?["
# Suffixes dropped from a file's path to make its tag.
_SOURCE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet", ".pq")


def split_patterns(pattern: str) -> list[str]:
    return [p for p in pattern.split(",") if p]


def _literal_dir(pattern: str) -> str:
    """The folder part of a pattern before its first glob character ('' for none)."""
    cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=-1)
    head = pattern if cut < 0 else pattern[:cut]
    if cut < 0 and (head.endswith("/") or ("://" not in head and os.path.isdir(head))):
        return head.rstrip("/") + "/"
    return head[: head.rfind("/") + 1] if "/" in head else ""


def input_root(pattern: str) -> str:
    """The deepest folder above every file the comma-separated `pattern` can match.

    Image identities are qualified by a file's path below this folder, so two
    img2dataset runs (both numbering their keys from 000000000) in run1/ and run2/ give
    run1/00000/000000000 and run2/00000/000000000, not one key twice.
    """
    dirs = [_literal_dir(p) for p in split_patterns(pattern)]
    if not dirs:
        return ""
    parts = [d.rstrip("/").split("/") for d in dirs]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    root = "/".join(common)
    if root:
        return root + "/"
    # Absolute paths with nothing in common but "/" keep the whole path as their tag.
    return "/" if all(d.startswith("/") for d in dirs) else ""


def source_tag(path: str, root: str) -> str:
    """A file's path below `root` without its format suffix: `run1/00000` for
    `<root>run1/00000.tar`."""
    rel = path[len(root) :] if path.startswith(root) else path
    rel = rel.lstrip("/")
    lower = rel.lower()
    for suffix in _SOURCE_SUFFIXES:
        if lower.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def image_identity(corpus_key, url, tag: Optional[str], qualify_url: bool = True) -> Optional[str]:
    """The one rule for an image's key, in every pass over a corpus.

    A corpus key (img2dataset's `key`, a key column) is only unique within its file, so it
    is qualified by the file's tag: `<tag>/<key>`. Without a key, the URL names the image:
    a hash of it, qualified by the tag too for image corpora (`qualify_url`), where two
    files may hold different downloads of one URL; in a caption-only corpus the URL alone
    is the identity (img2dataset downloads it once). None when the row has neither.
    An empty string is no key.
    """
    if corpus_key is not None and str(corpus_key) != "":
        return f"{tag}/{corpus_key}" if tag else str(corpus_key)
    if url is not None and str(url) != "":
        h = url_key(str(url))
        return f"{tag}/{h}" if tag and qualify_url else h
    return None


def is_hidden_file(path: str) -> bool:
    """img2dataset's `_stats.json`, editors' dot files: never corpus data."""
    return os.path.basename(path.rstrip("/")).startswith((".", "_"))


def expand_patterns(pattern: str) -> list[str]:
    """Globs to match for a comma list of paths, folders and globs (a folder: its files)."""
    out = []
    for p in split_patterns(pattern):
        if not any(ch in p for ch in _GLOB_CHARS):
            if "://" in p:
                # Object stores have no folders to test: a trailing slash says it.
                is_dir = p.endswith("/")
            else:
                is_dir = os.path.isdir(p)
            if is_dir:
                p = p.rstrip("/") + "/*"
        out.append(p)
    return out


def row_group_source(path: str, rg: int) -> str:
    return f"{path}#rg{rg}"


def source_file(source: str) -> str:
    """The file of a `source` (a path, or `path#rgN` for a Parquet row group)."""
    head, sep, tail = source.rpartition("#rg")
    return head if sep and tail.isdigit() else source


# Image locators: `t:<offset>:<size>` (a tar member), `p:<rg>:<row>` (a Parquet row);
# a key found more than once in a file carries several, joined by REF_SEP.
REF_SEP = ","


def merge_refs(a: Optional[str], b: Optional[str]) -> Optional[str]:
    """The union of two image-location lists, in a stable order."""
    if not a or a == b:
        return a or b
    if not b:
        return a
    return REF_SEP.join(sorted(set(a.split(REF_SEP)) | set(b.split(REF_SEP))))

