"""Webdataset tars (img2dataset's output and ours): samples, located members, ranged reads.

A sample is the run of adjacent members sharing a key (`KEY.jpg`, `KEY.txt`, `KEY.json`).
Image members can be skipped and *located* (`TarMemberRef`: offset and size), so a pass
that needs only captions or metadata reads no image bytes, and the images it keeps are
read back later with one ranged read each. Plain tars are read with seeks; compressed
tars (.tar.gz) by streaming, their members located in the decompressed stream.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from transforms.formats import safe_json
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
# The members of a sample that any pass uses; the others are located, never read.
TEXT_EXTENSIONS = ("txt", "json")


@dataclass(frozen=True)
class TarLimits:
    """Budgets of one tar, checked from member headers before any byte is read.

    `max_members`: members (of any kind) in one tar; past it the rest of the tar is one
    reject (`too_many_members`): a 2 MB .tar.gz of 300,000 one-byte members is not
    300,000 samples worth holding. `max_sample_bytes`: bytes of one sample's members (read or
    not); a member past it makes the sample a `sample_too_large` reject.
    `max_text_bytes`: a KEY.txt / KEY.json larger than this is not read (the sample is a
    reject). `max_tar_bytes`: bytes a pass that holds a whole tar's samples may hold;
    past it the rest of the tar is one reject (`tar_too_large`)."""

    max_members: int = 100_000
    max_sample_bytes: int = MAX_MEMBER_BYTES
    max_text_bytes: int = 4 * 1024 * 1024
    max_tar_bytes: int = 256 * 1024 * 1024


DEFAULT_LIMITS = TarLimits()


class TarLimitError(tarfile.TarError):
    """A tar over one of its budgets (`TarLimits`): the rest of it is one reject."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Refused:
    """A member that was neither read nor located: why (a reject reason) and its size."""

    reason: str
    detail: str
    size: int


def _tar_mode(path: Optional[str], fileobj) -> str:
    """Random access ('r:', members skipped by seeking) for plain tars; plain streaming
    ('r|') for the rest. Never 'r|*': the stream is a tar (a .tar.gz comes decompressed
    from open_read), so a file that is secretly bzip2/xz is an error, not decompressed."""
    plain = path is None or path.lower().endswith(".tar")
    # io objects have seekable(); Beam's CompressedFile has a `seekable` property.
    attr = getattr(fileobj, "seekable", None)
    seekable = attr() if callable(attr) else bool(attr)
    return "r:" if plain and seekable else "r|"


def iter_webdataset(fileobj, *, path: Optional[str] = None, read_ext=None, limits: TarLimits = DEFAULT_LIMITS) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes | TarMemberRef | Refused}) per sample of a webdataset tar, in
    order. Only regular files are members of a sample (links, devices and folders are
    skipped); names are keys, never paths written to (so `../x` is just an odd key).

    Files of one sample are adjacent in a webdataset tar; a sample ends when the key
    changes, or when a member repeats an extension the sample already has. The key is the
    member's basename up to the first dot (with its folder, if any). `read_ext(ext) ->
    bool` says which members to read; the others are given as `TarMemberRef`s (their bytes
    are skipped, by seeking when the tar is plain and seekable). By default every member
    is read. Budgets (`limits`) are checked from each header before its bytes: a sparse
    member (its stored bytes expand to any size) and a member past the sample's budget
    are `Refused`; past `max_members` the tar raises `TarLimitError`. Memory is one
    sample's members: the tar's member list is not kept.
    """
    current_key = None
    parts: dict = {}
    sample_bytes = 0
    members = 0
    mode = _tar_mode(path, fileobj)
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
        while True:
            member = tar.next()
            # tarfile keeps every header it reads in `members`: 300,000 headers of one tar
            # would stay in memory for nothing, so the list is emptied as the read goes.
            tar.members.clear()
            if member is None:
                break
            members += 1
            if members > limits.max_members:
                raise TarLimitError("too_many_members", f"more than {limits.max_members:,} members (--max_tar_members)")
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
                sample_bytes = 0
            current_key = key
            wanted = read_ext is None or read_ext(ext)
            cap = limits.max_text_bytes if ext in TEXT_EXTENSIONS else MAX_MEMBER_BYTES
            sample_bytes += member.size
            if member.issparse():
                parts[ext] = Refused("sparse_member", f"{name}: a sparse member ({member.size:,} bytes when expanded) is not read", member.size)
            elif sample_bytes > limits.max_sample_bytes:
                parts[ext] = Refused(
                    "sample_too_large",
                    f"{name}: the sample's members hold {sample_bytes:,} bytes > {limits.max_sample_bytes:,} (--max_sample_bytes)",
                    member.size,
                )
            elif wanted and member.size <= cap:
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
    """`read_ext` for passes that locate images instead of reading them: the caption and
    the metadata only."""
    return ext in TEXT_EXTENSIONS


def sample_members(ext: str) -> bool:
    """`read_ext` for passes that read images: the image, the caption and the metadata
    (any other member of a sample is located, never read)."""
    return ext in TEXT_EXTENSIONS or ext in IMAGE_EXTENSIONS


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
    # (reason, detail) when a member was refused (sparse, over the sample's budget): the
    # sample is a reject with that reason.
    refused: Optional[tuple[str, str]] = None


def parse_sample(key: str, parts: dict) -> TarSample:
    meta: dict = {}
    bad = None
    raw = parts.get("json")
    if isinstance(raw, (TarMemberRef, Refused)):
        bad = f"KEY.json of {raw.size} bytes is larger than the text member budget"
    elif isinstance(raw, (bytes, bytearray)):
        try:
            obj = safe_json.loads(raw)
            if isinstance(obj, dict):
                meta = obj
            else:
                bad = f"KEY.json is a {type(obj).__name__}, not an object"
        except safe_json.JSONError as e:
            bad = f"{e.reason}: {e.detail}"
    txt = parts.get("txt")
    if isinstance(txt, (bytes, bytearray)) and "caption" not in meta:
        meta = {**meta, "caption": bytes(txt).decode("utf-8", "replace")}
    refused = next(((r.reason, r.detail) for r in parts.values() if isinstance(r, Refused)), None)
    return TarSample(key, meta, image_member(parts), parts, bad, refused)


@dataclass
class TarDamage:
    """The end of a damaged tar: `error` stopped the read after `samples` samples."""

    error: BaseException
    samples: int


def iter_samples(fileobj, *, path: Optional[str] = None, locate_images: bool = False, limits: TarLimits = DEFAULT_LIMITS):
    """TarSample per sample, streaming (one sample in memory at a time); a damaged tar, or
    one over its `limits`, ends with one TarDamage after the samples before it. Only the
    members a sample needs are read (image unless `locate_images`, KEY.txt, KEY.json).
    Other errors (I/O) propagate."""
    n = 0
    read_ext = metadata_only if locate_images else sample_members
    try:
        for key, parts in iter_webdataset(fileobj, path=path, read_ext=read_ext, limits=limits):
            n += 1
            yield parse_sample(key, parts)
    except DAMAGE as e:
        yield TarDamage(e, n)


def read_samples(fileobj, *, path: Optional[str] = None, locate_images: bool = False, limits: TarLimits = DEFAULT_LIMITS):
    """(samples, error): every sample of a tar in order and, when the tar is damaged or
    over its limits, the error that stopped the read (the samples before it are kept).
    Holds them all: for located reads (no image bytes) or small tars; past
    `limits.max_tar_bytes` of member bytes held, the rest of the tar is a `tar_too_large`
    error."""
    samples: list[TarSample] = []
    held = 0
    for item in iter_samples(fileobj, path=path, locate_images=locate_images, limits=limits):
        if isinstance(item, TarDamage):
            return samples, item.error
        held += sum(len(v) for v in item.parts.values() if isinstance(v, (bytes, bytearray)))
        if held > limits.max_tar_bytes:
            return samples, TarLimitError("tar_too_large", f"more than {limits.max_tar_bytes:,} bytes of samples held (--max_tar_bytes)")
        samples.append(item)
    return samples, None


def damage_reason(error: BaseException) -> str:
    """The reject reason of what stopped a tar: a budget's own, else `broken_archive`."""
    return getattr(error, "reason", None) or "broken_archive"
