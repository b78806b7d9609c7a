"""Webdataset tars (img2dataset's output and ours): samples, located members, ranged reads.

A sample is the run of adjacent members sharing a key (`KEY.jpg`, `KEY.txt`, `KEY.json`).
Image members can be skipped and *located* (`TarMemberRef`: offset and size), so a pass
that needs only captions or metadata reads no image bytes, and the images it keeps are
read back later with one ranged read each. Plain tars are read with seeks; compressed
tars (.tar.gz) by streaming, their members located in the decompressed stream.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from transforms.formats.media import IMAGE_EXTENSIONS, image_member

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# What a damaged tar (or its compression) raises; other errors (I/O) propagate, so the
# runner retries the work.
DAMAGE = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)


def is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


TAR_BLOCK = 512


@dataclass(frozen=True)
class TarMemberRef:
    """Where a member's bytes lie in an uncompressed tar: read them back with one ranged
    read, and check the member header just before them."""

    data_offset: int
    size: int

    def locator(self) -> str:
        return f"t:{self.data_offset}:{self.size}"


# Members larger than this are never read into memory: an image is located instead (and
# refused when read back), a larger KEY.json / KEY.txt makes the sample a reject.
MAX_MEMBER_BYTES = 64 * 1024 * 1024


def _tar_mode(path: Optional[str], fileobj) -> str:
    """Random access ('r:', members skipped by seeking) for plain tars; plain streaming
    ('r|') for the rest. Never 'r|*': the stream is a tar (a .tar.gz comes decompressed
    from open_read), so a file that is secretly bzip2/xz is an error, not decompressed."""
    plain = path is None or path.lower().endswith(".tar")
    # io objects have seekable(); Beam's CompressedFile has a `seekable` property.
    attr = getattr(fileobj, "seekable", None)
    seekable = attr() if callable(attr) else bool(attr)
    return "r:" if plain and seekable else "r|"


def iter_webdataset(fileobj, *, path: Optional[str] = None, read_ext=None) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes | TarMemberRef}) per sample of a webdataset tar, in order.
    Only regular files are members of a sample (links, devices and folders are skipped);
    names are keys, never paths written to (so `../x` is just an odd key).

    Files of one sample are adjacent in a webdataset tar; a sample ends when the key
    changes, or when a member repeats an extension the sample already has. The key is the member's basename up to the first dot (with its folder, if
    any). `read_ext(ext) -> bool` says which members to read; the others are given as
    `TarMemberRef`s (their bytes are skipped, by seeking when the tar is plain and
    seekable). By default every member is read.
    """
    current_key = None
    parts: dict = {}
    mode = _tar_mode(path, fileobj)
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            base = os.path.basename(name)
            if base.startswith("."):
                continue
            dirname = os.path.dirname(name)
            stem, _, ext = base.partition(".")
            key = f"{dirname}/{stem}" if dirname else stem
            ext = ext.lower()
            # A new key starts a sample; so does a member the current sample already has
            # (a key repeated in the tar is two samples, not one that silently overwrites).
            if current_key is not None and (key != current_key or ext in parts):
                yield current_key, parts
                parts = {}
            current_key = key
            if (read_ext is None or read_ext(ext)) and member.size <= MAX_MEMBER_BYTES:
                f = tar.extractfile(member)
                parts[ext] = f.read() if f is not None else b""
            else:
                parts[ext] = TarMemberRef(member.offset_data, member.size)
    if current_key is not None:
        yield current_key, parts



def read_tar_member(fileobj, ref: TarMemberRef) -> bytes:
    """A member's bytes by its offset, after checking that the header block in front of
    them is a valid tar header of that size (so a tar rewritten since it was indexed is an
    error, not wrong bytes)."""
    if ref.size > MAX_MEMBER_BYTES:
        raise tarfile.ReadError(f"member of {ref.size} bytes > {MAX_MEMBER_BYTES} (MAX_MEMBER_BYTES): not read")
    fileobj.seek(ref.data_offset - TAR_BLOCK)
    block = fileobj.read(TAR_BLOCK + ref.size)
    if len(block) < TAR_BLOCK + ref.size:
        raise tarfile.ReadError(f"tar ends before the member at offset {ref.data_offset}")
    info = tarfile.TarInfo.frombuf(block[:TAR_BLOCK], tarfile.ENCODING, "surrogateescape")
    if info.size != ref.size:
        raise tarfile.ReadError(
            f"member header at offset {ref.data_offset - TAR_BLOCK} says {info.size} bytes, "
            f"expected {ref.size}: the tar changed since it was read"
        )
    return block[TAR_BLOCK:]


def webdataset_corpus_key(member_key: str, meta: dict, key_field: str = "key"):
    """A sample's corpus key: its metadata's key field, else the member name's stem."""
    value = meta.get(key_field)
    if value is not None and str(value) != "":
        return str(value)
    return member_key.rsplit("/", 1)[-1]


def metadata_only(ext: str) -> bool:
    """`read_ext` for passes that locate images instead of reading them."""
    return ext not in IMAGE_EXTENSIONS


@dataclass
class TarSample:
    """One sample: its member key, its parsed KEY.json (with KEY.txt as `caption` when the
    JSON has none), its image (bytes, a TarMemberRef, or None) and, when the JSON did not
    parse, why (`meta` is then empty)."""

    key: str
    meta: dict
    image: object
    parts: dict
    bad_json: Optional[str] = None


def parse_sample(key: str, parts: dict) -> TarSample:
    meta: dict = {}
    bad = None
    raw = parts.get("json")
    if isinstance(raw, TarMemberRef):
        bad = f"KEY.json of {raw.size} bytes is larger than MAX_MEMBER_BYTES"
    elif isinstance(raw, (bytes, bytearray)):
        try:
            obj = json.loads(bytes(raw).decode("utf-8"))
            if isinstance(obj, dict):
                meta = obj
            else:
                bad = f"KEY.json is a {type(obj).__name__}, not an object"
        except (UnicodeDecodeError, ValueError) as e:
            bad = f"{type(e).__name__}: {e}"
    txt = parts.get("txt")
    if isinstance(txt, (bytes, bytearray)) and "caption" not in meta:
        meta = {**meta, "caption": bytes(txt).decode("utf-8", "replace")}
    return TarSample(key, meta, image_member(parts), parts, bad)


@dataclass
class TarDamage:
    """The end of a damaged tar: `error` stopped the read after `samples` samples."""

    error: BaseException
    samples: int


def iter_samples(fileobj, *, path: Optional[str] = None, locate_images: bool = False):
    """TarSample per sample, streaming (one sample in memory at a time); a damaged tar
    ends with one TarDamage after the samples before the damage. Other errors (I/O)
    propagate."""
    n = 0
    try:
        for key, parts in iter_webdataset(fileobj, path=path, read_ext=metadata_only if locate_images else None):
            n += 1
            yield parse_sample(key, parts)
    except DAMAGE as e:
        yield TarDamage(e, n)


def read_samples(fileobj, *, path: Optional[str] = None, locate_images: bool = False):
    """(samples, error): every sample of a tar in order and, when the tar is damaged, the
    error that stopped the read (the samples before the damage are kept). Holds them all:
    for located reads (no image bytes) or small tars."""
    samples: list[TarSample] = []
    for item in iter_samples(fileobj, path=path, locate_images=locate_images):
        if isinstance(item, TarDamage):
            return samples, item.error
        samples.append(item)
    return samples, None
