"""Writing what a stage produces: the training shards (Parquet, TFRecord, webdataset; one
schema, written by decontaminate, refine and oven_to_shards), record Parquet files with their
written counts (`CountWritten`), and the rejects (`WriteRejects`: `rejected/<stage>/`, every
record with its reason) and dead letters of a run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import tarfile

import apache_beam as beam
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.errors import UsageError
from transforms.formats.tf_example import encode_example
from transforms.run.progress import counter
from transforms.schema import Reject, Sample, arrow_schema, to_row, truncate_json

WRITTEN_PREFIX = "written_"


class _CountFile(beam.DoFn):
    """A finalised file -> {"path", "rows", "bytes"}, its rows counted in the file itself."""

    def __init__(self, what: str):
        self.what = what

    def process(self, path: str):
        from apache_beam.io.filesystems import FileSystems

        from transforms.formats.shards import count_records

        rows = count_records(path)
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        counter(f"{WRITTEN_PREFIX}{self.what}").inc(rows)
        counter(f"files_{WRITTEN_PREFIX}{self.what}").inc()
        yield {"path": path, "rows": rows, "bytes": size}


class CountWritten(beam.PTransform):
    """The file names a Beam file sink reports after its final rename -> one dict per file
    with the rows read back from it; counter `written_<what>` sums them.

    This is what the count checks compare with the records a stage meant to write: a
    record lost between a transform and the files (a sink that drops one) shows up as a
    gap, which a counter incremented before the sink could never show.
    """

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def expand(self, paths):
        return paths | "CountRows" >> beam.ParDo(_CountFile(self.what))


def files_summary(counted: list[dict], fmt: str) -> dict:
    """`CountWritten`'s per-file dicts -> `{"format", "files", "rows", "bytes"}`."""
    counted = sorted(counted, key=lambda f: f["path"])
    return {
        "format": fmt,
        "files": [f["path"] for f in counted],
        "rows": {f["path"]: f["rows"] for f in counted},
        "bytes": {f["path"]: f["bytes"] for f in counted},
    }


class WriteRecordsToParquet(beam.PTransform):
    """Dataclass records -> `<prefix>-SSSSS-of-NNNNN.parquet`, schema from the record type.

    Returns the finalised file names (what Beam's Parquet sink reports)."""

    def __init__(self, prefix: str, record_cls, exclude: tuple[str, ...] = (), num_shards: int = 0):
        super().__init__()
        self.prefix = prefix
        self.record_cls = record_cls
        self.exclude = tuple(exclude)
        self.num_shards = num_shards

    def expand(self, records):
        exclude = self.exclude
        return (
            records
            | "ToRow" >> beam.Map(lambda r: to_row(r, exclude))
            | "WriteParquet"
            >> beam.io.WriteToParquet(
                self.prefix,
                arrow_schema(self.record_cls, exclude),
                file_name_suffix=".parquet",
                num_shards=self.num_shards,
                # Parquet readers seek by row group: keep them modest so a reader of
                # one shard does not need the whole file in memory.
                row_group_buffer_size=32 * 1024 * 1024,
            )
        )


class _QuietEmptySinks(logging.Filter):
    """Beam warns "No shards found to finalize" for every sink that wrote nothing; reject
    sinks write nothing by design when a stage rejects nothing (skip_if_empty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No shards found to finalize")


logging.getLogger("apache_beam.io.filebasedsink").addFilter(_QuietEmptySinks())

REJECTS_EMITTED = "rejects_emitted"
REJECTS_WRITTEN = f"{WRITTEN_PREFIX}rejects"


class _CountReject(beam.DoFn):
    """Counts a reject and cleans it of credentials (error texts may quote a request URL
    or a server's echo of a key) before it is written."""

    def process(self, r: Reject):
        from transforms.run.secrets import redact

        r = dataclasses.replace(
            r, detail=redact(r.detail or "") or r.detail, record_json=redact(r.record_json, strip_query=False) if r.record_json else r.record_json
        )
        counter(REJECTS_EMITTED).inc()
        counter(f"rejected_{r.stage}_{r.reason}").inc(r.count)
        if r.count == 0:
            # A file that could not be read at all: its rows are unknown, count the file.
            counter(f"rejected_{r.stage}_{r.reason}_files").inc()
        yield r


class WriteRejects(beam.PTransform):
    """Rejects -> `<output>/rejected/<stage>/rejects-*.jsonl`, one folder per stage that
    rejected something (a stage without rejects writes no empty file).

    `pcolls` may be one PCollection or a sequence of them. A stage not in `stages` goes to
    `rejected/other/`, so nothing is lost even when a new stage forgets to register.
    """

    def __init__(self, output_dir: str, stages: list[str]):
        super().__init__()
        self.output_dir = output_dir.rstrip("/")
        self.stages = list(stages) + ["other"]

    def expand(self, pcolls):
        if isinstance(pcolls, beam.PCollection):
            pcolls = [pcolls]
        merged = tuple(pcolls) | "FlattenRejects" >> beam.Flatten()
        index = {s: i for i, s in enumerate(self.stages)}
        other = len(self.stages) - 1
        parts = (
            merged
            | "CountRejects" >> beam.ParDo(_CountReject())
            | "ByStage"
            >> beam.Partition(lambda r, n: index.get(r.stage, other), len(self.stages))
        )
        files = []
        for stage, part in zip(self.stages, parts):
            files.append(
                part
                | f"ToJson_{stage}" >> beam.Map(Reject.to_json)
                | f"Write_{stage}"
                >> beam.io.WriteToText(
                    f"{self.output_dir}/rejected/{stage}/rejects",
                    file_name_suffix=".jsonl",
                    # A stage with no rejects leaves no file (and no folder on a local disk).
                    skip_if_empty=True,
                )
            )
        # Every reject line is counted again in the finished files (`written_rejects`),
        # and the run's count check compares it with the rejects emitted.
        _ = tuple(files) | "RejectFiles" >> beam.Flatten() | "CountRejectLines" >> CountWritten("rejects")
        return merged


class DeadLetters(beam.DoFn):
    """RunInference's failed batches -> one Reject per record."""

    def __init__(self, stage: str, reason: str):
        self.stage = stage
        self.reason = reason

    def process(self, element):
        batch, error = element if isinstance(element, tuple) and len(element) == 2 else (element, "")
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            # Keyed elements: (key, example); the key may itself be (record, extra).
            record = item
            while isinstance(record, tuple) and record:
                record = record[0]
            yield Reject(
                stage=self.stage,
                reason=self.reason,
                detail=str(error)[:1000],
                key=getattr(record, "key", None),
                source=getattr(record, "source", None),
                record_json=truncate_json(
                    dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record
                ),
            )


SHARD_FORMATS = ("parquet", "tfrecord", "webdataset")


def parse_formats(value: str, flag: str = "--formats") -> tuple[str, ...]:
    """A comma list of shard formats -> the distinct formats, in `SHARD_FORMATS` order.

    Raises UsageError naming `flag` and the valid values when the list is empty or names an
    unknown format.
    """
    valid = ", ".join(SHARD_FORMATS)
    asked = [v.strip().lower() for v in (value or "").split(",") if v.strip()]
    if not asked:
        raise UsageError(f"{flag} is empty: give one or more of {valid} (comma-separated)")
    unknown = sorted({v for v in asked if v not in SHARD_FORMATS})
    if unknown:
        raise UsageError(f"{flag}: unknown format(s) {', '.join(unknown)}; valid: {valid}")
    return tuple(f for f in SHARD_FORMATS if f in asked)


# --- webdataset --------------------------------------------------------------------------

# webdataset splits a member name into key and extension at the first '.' of its last path
# component, so '.' and '/' in a key would change the key (or make a directory); control
# characters and backslashes have no business in a file name either.
_UNSAFE_IN_KEY = re.compile(r"[./\\\x00-\x1f\x7f]")
_EXTENSION = re.compile(r"^[a-z0-9]+$")
_BLOCK = 512


def webdataset_key(key: str) -> str:
    """The tar member key for a sample key: itself when safe, else the unsafe characters
    replaced by '_' plus a hash of the original, so that "a/b" and "a_b" stay distinct."""
    if key and not _UNSAFE_IN_KEY.search(key):
        return key
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
    return f"{_UNSAFE_IN_KEY.sub('_', key)}-{digest}"


def webdataset_members(sample: Sample) -> list[tuple[str, bytes]]:
    """(member name, data) of one sample, in the order they are written."""
    key = webdataset_key(sample.key)
    ext = (sample.image_format or "").lower()
    if not _EXTENSION.match(ext):
        ext = "img"
    meta = to_row(sample, exclude=("image",))
    return [
        (f"{key}.{ext}", bytes(sample.image or b"")),
        (f"{key}.txt", (sample.title or "").encode("utf-8")),
        (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
    ]


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member: header (PAX only when the name needs it), data, zero padding."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic output: the same samples give the same bytes
    info.mode = 0o644
    header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (-len(data) % _BLOCK)


class _WebDatasetSink(FileBasedSink):
    """Tar shards written member by member, so a shard never has to fit in memory."""

    def __init__(self, file_path_prefix: str, num_shards: int = 0):
        super().__init__(
            file_path_prefix,
            coder=None,  # write_record is overridden: records are never coder-encoded
            file_name_suffix=".tar",
            num_shards=num_shards,
            mime_type="application/x-tar",
            compression_type=CompressionTypes.UNCOMPRESSED,
        )

    def write_record(self, file_handle, value: Sample):
        for name, data in webdataset_members(value):
            file_handle.write(tar_member(name, data))

    def close(self, file_handle):
        if file_handle is not None:
            file_handle.write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        super().close(file_handle)


# --- all formats -------------------------------------------------------------------------


class WriteShards(beam.PTransform):
    """PCollection[Sample] -> shards in each of `formats` under `output_dir`.

    `num_shards=0` lets the runner choose the number of files. Returns a PCollection of
    `{"format": fmt, "files": [sorted paths], "rows": {path: n}, "bytes": {path: n}}`, one
    per format, read back from the finished files; counter `written_<name>_<format>` sums
    the rows (what the count checks compare with the samples a stage kept).
    """

    def __init__(self, output_dir: str, name: str, formats, num_shards: int = 0):
        super().__init__()
        formats = tuple(formats)
        bad = [f for f in formats if f not in SHARD_FORMATS]
        if not formats or bad:
            raise ValueError(f"formats must be a non-empty subset of {SHARD_FORMATS}, got {formats}")
        self.prefix = FileSystems.join(output_dir, name)
        self.name = name
        self.formats = tuple(dict.fromkeys(formats))
        self.num_shards = num_shards

    def expand(self, samples):
        summaries = []
        for fmt in self.formats:
            if fmt == "parquet":
                files = samples | "Parquet" >> WriteRecordsToParquet(
                    self.prefix, Sample, num_shards=self.num_shards
                )
            elif fmt == "tfrecord":
                files = (
                    samples
                    | "EncodeExample" >> beam.Map(encode_example)
                    | "TFRecord"
                    >> beam.io.WriteToTFRecord(
                        self.prefix, file_name_suffix=".tfrecord", num_shards=self.num_shards
                    )
                )
            else:
                files = samples | "WebDataset" >> beam.io.iobase.Write(
                    _WebDatasetSink(self.prefix, self.num_shards)
                )
            counted = files | f"Count_{fmt}" >> CountWritten(f"{self.name}_{fmt}")
            summaries.append(
                counted
                | f"ListFiles_{fmt}" >> beam.combiners.ToList()
                | f"Summary_{fmt}" >> beam.Map(files_summary, fmt)
            )
        return tuple(summaries) | "Summaries" >> beam.Flatten()
