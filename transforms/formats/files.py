"""Opening files without importing Beam for local paths.

Local paths are opened directly (a `.gz` file is decompressed, as Beam's FileSystems
does); a URL (gs://, s3://, ...) goes through Beam's FileSystems, imported only then.
A `.gz` file is always decompressed by the `gzip` module, which hands out at most what is
asked for: Beam's own decompressing reader inflates a whole 16 MB read at once, so 1.5 MB
of gzip-compressed zeros would cost gigabytes before a reader could look at them.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os


def is_url(path: str) -> bool:
    return "://" in path


def open_read(path: str):
    """A binary file object for `path`; `.gz` files come out decompressed."""
    if is_url(path):
        from apache_beam.io.filesystems import CompressionTypes, FileSystems

        if path.lower().endswith(".gz"):
            return gzip.GzipFile(fileobj=FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED), mode="rb")
        return FileSystems.open(path)
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def match_files(pattern: str, flag: str) -> list[str]:
    """Expand a path, a directory or a glob (local or gs://), or a comma list of them, into
    a sorted list of files (hidden and `_`-prefixed names skipped). Raises UsageError
    naming `flag` when nothing matches, so a typo fails before any work. Matching goes
    through Beam's FileSystems (its glob rules, local and remote alike), imported here."""
    from apache_beam.io.filesystems import FileSystems

    from transforms.errors import UsageError

    patterns = [p for p in pattern.split(",") if p]
    if not patterns:
        raise UsageError(f"{flag} is empty: give a file, a directory or a glob")
    paths: list[str] = []
    for p in patterns:
        if not any(ch in p for ch in "*?[") and FileSystems.exists(p) and _is_dir(p):
            p = FileSystems.join(p, "*")
        try:
            results = FileSystems.match([p])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - Beam raises BeamIOError and friends
            raise UsageError(f"{flag}: cannot list {p!r}: {e}") from e
        paths.extend(
            m.path
            for m in results
            if not os.path.basename(m.path).startswith((".", "_"))
            and not m.path.endswith("/")
        )
    paths = sorted(set(paths))
    if not paths:
        raise UsageError(f"{flag}: no file matches {pattern!r}; check the path or quote the glob")
    return paths


def _is_dir(path: str) -> bool:
    if "://" in path:
        return path.endswith("/")
    return os.path.isdir(path)


def basename(path: str) -> str:
    return os.path.basename(path.rstrip("/"))


class Skip(Exception):
    """A record (or the rest of a file) that cannot be used; `reason` is its counter name.
    Readers yield it in place of the record, so the stream goes on and the loss is counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_data_error(e: BaseException) -> bool:
    """True when `e` says the bytes are bad (the same bytes fail the same way on every
    try): a damaged archive or compression stream, text that is not UTF-8 or JSON, a
    Parquet file pyarrow cannot parse. False for errors of the environment (I/O, network,
    memory), which must be raised so the work is retried, never turned into rejects."""
    import gzip
    import json
    import struct
    import tarfile
    import zlib

    if isinstance(e, (MemoryError, ConnectionError, TimeoutError, InterruptedError)):
        return False
    # RecursionError: a parser (json, a decoder) walked a document nested past Python's
    # limit; the same bytes fail the same way on every try.
    if isinstance(e, (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeError, struct.error, json.JSONDecodeError, RecursionError)):
        return True
    try:
        import pyarrow as pa

        if isinstance(e, pa.ArrowInvalid):
            return True
        if isinstance(e, pa.ArrowException) and not isinstance(e, OSError):
            return True
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    return isinstance(e, ValueError) and not isinstance(e, OSError)


def maybe_gunzip(raw) -> io.BufferedIOBase:
    """Wrap a binary stream in gzip when its first bytes are the gzip magic."""
    head = raw.read(2)
    rest = raw
    stream = _Prepended(head, rest)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream)
    return stream


class _Prepended(io.RawIOBase):
    def __init__(self, head: bytes, rest):
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(b))
        n = len(data)
        b[:n] = data
        return n


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON at `path` (local, or a URL through Beam's FileSystems)."""
    data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if is_url(path):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(path) as f:
            f.write(data)
        return
    # Written beside and renamed into place: a run stopped half-way (a full disk, a kill)
    # leaves the old file or none, never half a manifest.
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if e.filename is None:  # a failed write names no file: name it (a full disk's line shows it)
            raise OSError(e.errno, e.strerror, path) from e
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_json(path: str):
    return json.loads(read_bytes(path).decode("utf-8"))


def ensure_dir(path: str) -> None:
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
