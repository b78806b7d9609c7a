"""The LLM response cache: answers by request hash, written in batches, read by hash.

Layout under the cache folder (local or gs://):

    segments/<time>-<writer>-<n>.jsonl.gz   what a process wrote since its last flush:
                                            one {"key", "entry"} line per answer
    index/g<time>-<id>/part-NNNNN.parquet   a generation: entries hash-partitioned by key
    index/g<time>-<id>/_MANIFEST.json       (int(key[:8], 16) % partitions), each part sorted
                                            by key in row groups of ROW_GROUP rows
    <hh>/<key>.json                         the layout of earlier versions, still read

* **Writes** are batched: a process buffers its answers and a background thread writes one
  segment per FLUSH_ENTRIES answers or FLUSH_SECONDS seconds, whichever comes first, and at
  the end of every batch of requests (the batch waits for it, so a finished bundle's
  answers are stored). 600M answers are ~2M segment objects, not 600M. A killed process
  loses at most its last FLUSH_SECONDS of answers.
* **Reads** go by hash: the key's partition in each generation, the row group whose key
  range holds it (row-group statistics, the footer read once per part and kept), one
  ranged read of that row group (kept in a small LRU). Read errors are retried, then
  raised: an unreadable cache is never taken for a miss (that would pay again).
* **Compaction** (`compact`) turns segments (and entries of the old layout) into a new
  generation: before a run starts, so everything earlier runs wrote (a killed run
  included) is readable by hash. Small ones run on the launcher, large ones as a Beam job
  (`compact_pipeline`). When there are more than MAX_GENERATIONS generations they are
  merged into one. Answers written during a run are also kept in the process (an LRU), so
  a re-ask in the same process finds them.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import threading
import time
import uuid
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from transforms.formats import safe_json
from transforms.io.retry import retry_call

log = logging.getLogger(__name__)

SEGMENTS = "segments"
INDEX = "index"
MANIFEST = "_MANIFEST.json"
FLUSH_ENTRIES = 512
FLUSH_SECONDS = 2.0
ROW_GROUP = 256
PART_BYTES = 64 << 20
MAX_GENERATIONS = 6
LAUNCHER_COMPACTION_BYTES = 256 << 20  # segments up to this size are compacted on the launcher
ROW_GROUPS_KEPT = 64
OWN_ENTRIES_KEPT = 50_000


def partition_of(key: str, partitions: int) -> int:
    return int(key[:8], 16) % partitions


def _is_local(path: str) -> bool:
    return "://" not in path


def _write_atomic(path: str, data: bytes) -> None:
    """One object put (object stores) or a write under a temporary name and a rename
    (local): a reader never sees half an object."""
    if _is_local(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if e.filename is None:  # a failed write names no file: name the segment (a full disk's line shows it)
                raise OSError(e.errno, e.strerror, path) from e
            raise
        return
    with FileSystems.create(path) as f:
        f.write(data)


def _read(path: str) -> bytes:
    def read():
        with FileSystems.open(path, compression_type="uncompressed") as f:
            return f.read()

    return retry_call(read, path)


def _match(pattern: str) -> list:
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # noqa: BLE001 - Beam raises BeamIOError for "nothing matched" on some filesystems
        if "No files found" in str(e) or "not found" in str(e).lower():
            return []
        raise


# --------------------------------------------------------------------------------------
# Generations (what readers see)
# --------------------------------------------------------------------------------------


class _Part:
    """One sorted Parquet part: its row groups' key ranges, read once."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        def meta():
            with FileSystems.open(self.path, compression_type="uncompressed") as f:
                return pq.ParquetFile(f).metadata

        self.path = path
        md = retry_call(meta, path)
        self.metadata = md
        self.mins: list[str] = []
        self.maxs: list[str] = []
        col = md.schema.to_arrow_schema().get_field_index("key")
        for i in range(md.num_row_groups):
            stats = md.row_group(i).column(col).statistics
            lo, hi = stats.min, stats.max
            self.mins.append(lo.decode() if isinstance(lo, bytes) else lo)
            self.maxs.append(hi.decode() if isinstance(hi, bytes) else hi)

    def row_group_of(self, key: str) -> Optional[int]:
        i = bisect_right(self.mins, key) - 1
        if i < 0 or key > self.maxs[i]:
            return None
        return i

    def read_row_group(self, i: int) -> dict[str, str]:
        import pyarrow.parquet as pq

        def read():
            with FileSystems.open(self.path, compression_type="uncompressed") as f:
                table = pq.ParquetFile(f, metadata=self.metadata).read_row_group(i, columns=["key", "entry"])
            return dict(zip(table.column("key").to_pylist(), table.column("entry").to_pylist()))

        return retry_call(read, f"{self.path} row group {i}")


class _Generation:
    def __init__(self, folder: str, manifest: dict):
        self.folder = folder
        self.name = folder.rstrip("/").rsplit("/", 1)[-1]
        self.partitions = int(manifest["partitions"])
        self.parts = set(manifest["parts"])
        self.manifest = manifest

    def part_path(self, p: int) -> Optional[str]:
        name = f"part-{p:05d}.parquet"
        return f"{self.folder}/{name}" if name in self.parts else None


def list_generations(root: str) -> list[_Generation]:
    """The generations readers use, newest first: every finished one (with a manifest) that
    no later merge superseded."""
    found = []
    for m in _match(f"{root}/{INDEX}/*/{MANIFEST}"):
        folder = m.path[: -len(MANIFEST) - 1]
        found.append(_Generation(folder, json.loads(_read(m.path).decode("utf-8"))))
    found.sort(key=lambda g: g.name, reverse=True)
    superseded = set()
    live = []
    for g in found:
        if g.name in superseded:
            continue
        live.append(g)
        superseded.update(g.manifest.get("supersedes", []))
    return live


# --------------------------------------------------------------------------------------
# The cache a process uses
# --------------------------------------------------------------------------------------


class ResponseCache:
    """Raw answers by request hash under a local or gs:// folder (layout above).

    `get` and `put` are thread-safe; `get` does blocking reads (the openai backend calls it
    from a thread pool, not on its event loop); `put` only buffers. `flush()` writes what is
    buffered and waits; `close()` flushes and stops the writer.
    """

    def __init__(self, root: Optional[str], flush_entries: int = FLUSH_ENTRIES, flush_seconds: float = FLUSH_SECONDS):
        self.root = root.rstrip("/") if root else None
        self.flush_entries = flush_entries
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._buffer: list[tuple[str, dict]] = []
        self._first_buffered = 0.0
        self._own: OrderedDict[str, dict] = OrderedDict()
        self._row_groups: OrderedDict[tuple, dict] = OrderedDict()
        self._parts: dict[str, Optional[_Part]] = {}
        self._generations: Optional[list[_Generation]] = None
        self._legacy: Optional[bool] = None
        self._writer_id = uuid.uuid4().hex[:12]
        self._seq = 0
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.segments_written = 0

    # -- reading --------------------------------------------------------------------------
    def generations(self) -> list[_Generation]:
        if self._generations is None:
            self._generations = list_generations(self.root) if self.root else []
        return self._generations

    def _legacy_exists(self) -> bool:
        if self._legacy is None:
            absorbed = any(g.manifest.get("legacy_absorbed") for g in self.generations())
            self._legacy = not absorbed and bool(self.root) and bool(_match(f"{self.root}/[0-9a-f][0-9a-f]/*.json"))
        return self._legacy

    def _part(self, path: str) -> _Part:
        with self._lock:
            part = self._parts.get(path)
        if part is None:
            part = _Part(path)
            with self._lock:
                self._parts[path] = part
        return part

    def _row_group(self, part: _Part, i: int) -> dict[str, str]:
        k = (part.path, i)
        with self._lock:
            rows = self._row_groups.get(k)
            if rows is not None:
                self._row_groups.move_to_end(k)
                return rows
        rows = part.read_row_group(i)
        with self._lock:
            self._row_groups[k] = rows
            while len(self._row_groups) > ROW_GROUPS_KEPT:
                self._row_groups.popitem(last=False)
        return rows

    def get(self, key: str) -> Optional[dict]:
        if not self.root:
            return None
        with self._lock:
            own = self._own.get(key)
        if own is not None:
            return own
        for g in self.generations():
            path = g.part_path(partition_of(key, g.partitions))
            if path is None:
                continue
            part = self._part(path)
            i = part.row_group_of(key)
            if i is None:
                continue
            raw = self._row_group(part, i).get(key)
            if raw is not None:
                return self._decode(raw, key)
        if self._legacy_exists():
            return self._legacy_get(key)
        return None

    @staticmethod
    def _decode(raw, where: str) -> Optional[dict]:
        try:
            entry = safe_json.loads(raw)
            return entry if isinstance(entry, dict) else None
        except (UnicodeDecodeError, ValueError):
            log.warning("cache entry %s is not JSON; asking again", where)
            return None

    def _legacy_get(self, key: str) -> Optional[dict]:
        path = f"{self.root}/{key[:2]}/{key}.json"

        def read() -> Optional[bytes]:
            try:
                with FileSystems.open(path, compression_type="uncompressed") as f:
                    return f.read()
            except FileNotFoundError:
                return None
            except Exception:  # noqa: BLE001 - an object store's "not found" has many names
                if not FileSystems.exists(path):
                    return None
                raise

        raw = retry_call(read, path)
        return None if raw is None else self._decode(raw, path)

    # -- writing --------------------------------------------------------------------------
    def put(self, key: str, entry: dict) -> None:
        if not self.root:
            return
        with self._lock:
            self._own[key] = entry
            while len(self._own) > OWN_ENTRIES_KEPT:
                self._own.popitem(last=False)
            if not self._buffer:
                self._first_buffered = time.monotonic()
            self._buffer.append((key, entry))
            full = len(self._buffer) >= self.flush_entries
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llm-cache-writer", daemon=True)
                self._thread.start()
        if full:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_seconds / 4)
            self._wake.clear()
            with self._lock:
                due = self._buffer and (
                    len(self._buffer) >= self.flush_entries or time.monotonic() - self._first_buffered >= self.flush_seconds
                )
            if due:
                try:
                    self.flush()
                except Exception as e:  # noqa: BLE001 - kept buffered, tried again at the next flush
                    log.warning("LLM cache segment not written yet (%s); will try again", e)

    def flush(self) -> int:
        """Write what is buffered as one segment (retrying errors of the environment);
        returns the number of entries written. Raises when the store stays unwritable: the
        entries stay buffered."""
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if not batch:
                return 0
            lines = b"".join(
                json.dumps({"key": k, "entry": e}, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n" for k, e in batch
            )
            self._seq += 1
            name = f"{int(time.time() * 1000):013d}-{self._writer_id}-{self._seq:06d}.jsonl.gz"
            path = f"{self.root}/{SEGMENTS}/{name}"
            try:
                retry_call(lambda: _write_atomic(path, gzip.compress(lines, compresslevel=5)), path)
            except Exception:
                with self._lock:
                    self._buffer[:0] = batch
                raise
            self.segments_written += 1
            return len(batch)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        if self.root:
            self.flush()


# --------------------------------------------------------------------------------------
# Compaction
# --------------------------------------------------------------------------------------


def read_segment(path: str) -> Iterator[tuple[str, str]]:
    """(key, entry JSON) of a segment; a damaged line or tail (a write cut short by a kill
    never reaches its final name, but a copy could be cut) ends the segment with a warning."""
    data = _read(path)
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError) as e:
        log.warning("cache segment %s is damaged (%s): skipped", path, e)
        return
    for line in text.splitlines():
        try:
            record = safe_json.loads(line)
            yield record["key"], json.dumps(record["entry"], ensure_ascii=False, sort_keys=True)
        except (ValueError, KeyError, TypeError):
            log.warning("cache segment %s has a damaged line: skipped", path)


def read_part(path: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    def read():
        with FileSystems.open(path, compression_type="uncompressed") as f:
            return pq.read_table(f, columns=["key", "entry"])

    table = retry_call(read, path)
    yield from zip(table.column("key").to_pylist(), table.column("entry").to_pylist())


def read_legacy(path: str) -> Iterator[tuple[str, str]]:
    key = path.rsplit("/", 1)[-1][: -len(".json")]
    raw = _read(path)
    try:
        yield key, json.dumps(safe_json.loads(raw), ensure_ascii=False, sort_keys=True)
    except (UnicodeDecodeError, ValueError):
        log.warning("old-layout cache entry %s is not JSON: skipped", path)


def read_source(source: tuple[str, str]) -> Iterator[tuple[str, str]]:
    kind, path = source
    return {"segment": read_segment, "part": read_part, "legacy": read_legacy}[kind](path)


def write_part(folder: str, p: int, entries: Iterable[tuple[str, str]]) -> str:
    """Entries of one partition, deduplicated by key and sorted, as part-NNNNN.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    unique = dict(entries)  # one answer per key (the same request asked twice: either answer)
    keys = sorted(unique)
    table = pa.table({"key": keys, "entry": [unique[k] for k in keys]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="zstd")
    name = f"part-{p:05d}.parquet"
    path = f"{folder}/{name}"
    retry_call(lambda: _write_atomic(path, buf.getvalue()), path)
    return name


class CompactionPlan:
    """What a compaction reads and where it writes."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        generations = list_generations(self.root)
        absorbed = set()
        for g in generations:
            absorbed.update(g.manifest.get("absorbed", []))
        segments = _match(f"{self.root}/{SEGMENTS}/*.jsonl.gz")
        self.done_segments = [m.path for m in segments if m.path.rsplit("/", 1)[-1] in absorbed]
        self.segments = [m for m in segments if m.path.rsplit("/", 1)[-1] not in absorbed]
        legacy_absorbed = any(g.manifest.get("legacy_absorbed") for g in generations)
        self.legacy = [] if legacy_absorbed else _match(f"{self.root}/[0-9a-f][0-9a-f]/*.json")
        self.merge = len(generations) + 1 > MAX_GENERATIONS
        self.generations = generations
        self.parts: list = []
        if self.merge:
            for g in generations:
                self.parts += [f"{g.folder}/{name}" for name in sorted(g.parts)]
        new_bytes = sum(m.size_in_bytes for m in self.segments) * 4 + sum(m.size_in_bytes for m in self.legacy)
        old_bytes = sum(g.manifest.get("bytes", 0) for g in generations) if self.merge else 0
        self.bytes = new_bytes + old_bytes  # uncompressed, roughly (segments are gzip, ~4x)
        self.partitions = max(1, -(-self.bytes // PART_BYTES))
        self.name = f"g{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        self.folder = f"{self.root}/{INDEX}/{self.name}"

    @property
    def needed(self) -> bool:
        return bool(self.segments or self.legacy)

    def sources(self) -> list[tuple[str, str]]:
        return (
            [("segment", m.path) for m in self.segments]
            + [("legacy", m.path) for m in self.legacy]
            + [("part", p) for p in self.parts]
        )

    def finish(self, parts: list[str], entries: int) -> dict:
        manifest = {
            "partitions": self.partitions,
            "parts": sorted(parts),
            "entries": entries,
            "bytes": self.bytes,
            "absorbed": sorted(m.path.rsplit("/", 1)[-1] for m in self.segments),
            "legacy_absorbed": bool(self.legacy) or any(g.manifest.get("legacy_absorbed") for g in self.generations),
            "supersedes": [g.name for g in self.generations] if self.merge else [],
            "created": time.time(),
        }
        _write_atomic(f"{self.folder}/{MANIFEST}", json.dumps(manifest, indent=1).encode("utf-8"))
        # The manifest lists what it absorbed: deleting the segments now (or at the next
        # compaction, if this one is killed first) loses nothing.
        done = [m.path for m in self.segments] + self.done_segments
        for i in range(0, len(done), 1000):
            try:
                FileSystems.delete(done[i : i + 1000])
            except Exception as e:  # noqa: BLE001 - absorbed segments are skipped by readers anyway
                log.warning("absorbed cache segments not deleted yet: %s", e)
        return manifest


def compact_local(plan: CompactionPlan) -> dict:
    """The compaction on this machine (small caches)."""
    by_part: dict[int, list[tuple[str, str]]] = {}
    for source in plan.sources():
        for key, entry in read_source(source):
            by_part.setdefault(partition_of(key, plan.partitions), []).append((key, entry))
    parts = [write_part(plan.folder, p, entries) for p, entries in sorted(by_part.items())]
    total = sum(len(dict(e)) for e in by_part.values())
    return plan.finish(parts, total)


def compact_pipeline(p, plan: CompactionPlan):
    """The compaction as Beam steps (large caches): sources spread over workers, entries
    grouped by partition, each partition written sorted by one worker. Returns the
    PCollection of (part name, entries)."""
    import apache_beam as beam

    partitions = plan.partitions
    folder = plan.folder

    def write(element):
        p, entries = element
        entries = list(entries)
        return write_part(folder, p, entries), len(dict(entries))

    return (
        p
        | "CacheSources" >> beam.Create(plan.sources())
        | "SpreadSources" >> beam.Reshuffle()
        | "ReadSources" >> beam.FlatMap(read_source)
        | "ByPartition" >> beam.Map(lambda kv: (partition_of(kv[0], partitions), kv))
        | "GroupPartitions" >> beam.GroupByKey()
        | "WriteParts" >> beam.Map(write)
    )


def compact(root: str, options=None) -> Optional[dict]:
    """Absorb the segments (and old-layout entries) under `root` into a new generation; a
    Beam job with `options` when they are large. Returns the new manifest, None when there
    was nothing to do."""
    plan = CompactionPlan(root)
    if not plan.needed:
        return None
    started = time.time()
    if options is None or plan.bytes <= LAUNCHER_COMPACTION_BYTES:
        manifest = compact_local(plan)
    else:
        import apache_beam as beam

        p = beam.Pipeline(options=options)
        results = compact_pipeline(p, plan)
        out = f"{plan.folder}/_parts.jsonl"
        _ = results | "Json" >> beam.Map(json.dumps) | "Record" >> beam.io.WriteToText(out, shard_name_template="")
        p.run().wait_until_finish()
        written = [json.loads(line) for line in _read(out).decode("utf-8").splitlines() if line]
        manifest = plan.finish([w[0] for w in written], sum(w[1] for w in written))
    log.info(
        "LLM cache %s: %d segments and %d old-layout entries compacted into %s (%d entries, %d parts) in %.1f s",
        root, len(plan.segments), len(plan.legacy), plan.name, manifest["entries"], len(manifest["parts"]),
        time.time() - started,
    )
    return manifest


def count_entries(root: str) -> int:
    """Answers stored under `root`: in generations, segments not yet absorbed, old layout."""
    plan = CompactionPlan(root)
    n = sum(sum(1 for _ in read_segment(m.path)) for m in plan.segments) + len(plan.legacy)
    return n + sum(int(g.manifest.get("entries", 0)) for g in plan.generations)
