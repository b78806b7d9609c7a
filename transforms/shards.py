"""Training shards: `Sample` records to Parquet, TFRecord and webdataset, one schema for all.

Every format is derived from the one declaration of `transforms.schema.Sample`: the Parquet
schema from its Arrow types (`arrow_schema`), the tf.train.Example features from its `tf`
names (`transforms.example_proto`), the webdataset JSON from its fields (`to_row`). So a
field added to `Sample` appears in all three formats without touching this module.

Files are `<output_dir>/<name>-SSSSS-of-NNNNN.{parquet,tfrecord,tar}` (Beam's default shard
template). The webdataset tars follow img2dataset's layout, one sample per key:
`KEY.<image_format>` (the image bytes), `KEY.txt` (the entity title) and `KEY.json`
(every field but the image, including the original `key`).

`WriteShards` returns a PCollection with one `{"format": ..., "files": [...]}` per format,
the file names Beam's writers report after the final rename, for the run manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile

import apache_beam as beam
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.common import UsageError
from transforms.example_proto import encode_example
from transforms.schema import Sample, to_row
from transforms.sinks import CountWritten, WriteRecordsToParquet, files_summary

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
