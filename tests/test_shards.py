"""Shard writers: each format is written through WriteShards on Beam and read back with a
reader that shares no code with the writer (pyarrow and DuckDB; a hand-rolled TFRecord
framing parser with the `tfrecord` package's generated Example class; the webdataset
library), and every field of every sample must come back exactly (floats as float32)."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import struct
import tarfile
import typing

import apache_beam as beam
import google_crc32c
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import BeamAssertException, assert_that

from tests.conftest import direct_pipeline
from tests.helpers import draw_image
from transforms.errors import UsageError
from transforms.formats.tf_example import encode_example, feature_spec_markdown
from transforms.io.writers import SHARD_FORMATS, WriteShards, parse_formats
from transforms.schema import Sample

EXTENSIONS = {"parquet": "parquet", "tfrecord": "tfrecord", "webdataset": "tar"}
FIELDS = [f.name for f in dataclasses.fields(Sample)]
HINTS = typing.get_type_hints(Sample)
# The Python type of each field without Optional: what the test expects to read back.
BASE_TYPE = {
    name: next(a for a in typing.get_args(h) if a is not type(None)) if typing.get_args(h) else h
    for name, h in HINTS.items()
}
NULLABLE = {name for name, h in HINTS.items() if type(None) in typing.get_args(h)}
TF_NAME = {f.name: f.metadata["tf"] for f in dataclasses.fields(Sample)}
TF_KIND = {str: "bytes_list", bytes: "bytes_list", int: "int64_list", bool: "int64_list", float: "float_list"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_samples() -> list[Sample]:
    jpeg, png, jpeg2, png2 = (
        draw_image(1, fmt="JPEG"),
        draw_image(2, fmt="PNG"),
        draw_image(3, fmt="JPEG"),
        draw_image(4, fmt="PNG"),
    )
    return [
        Sample(
            key="laion-000001",
            image=jpeg,
            image_format="jpg",
            width=64,
            height=48,
            image_sha256=_sha(jpeg),
            url="https://example.org/eiffel.jpg",
            caption="Eiffel Tower at night",
            qid="Q243",
            title="Eiffel Tower",
            entity_id=2**40 + 7,  # does not fit an int32
            score=0.1,  # not exactly representable: compared as float32
            rank=1,
            retrieval_rank=3,
            max_eval_similarity=0.3333,
            nearest_eval_id="oven/val/000123",
            source="gs://bucket/laion/part-00000.parquet",
            meta_json='{"NSFW": "UNLIKELY"}',
        ),
        Sample(
            # '/', '.' and non-ASCII in the key: unsafe as a tar member name as is.
            key="laion/café/000002.jpg",
            image=png,
            image_format="png",
            width=64,
            height=48,
            image_sha256=_sha(png),
            url="https://example.org/zürich.png",
            caption="Zürich Hauptbahnhof — 東京駅 と Ελλάδα",
            qid="Q676",
            title="Zürich Hauptbahnhof — 東京駅",
            entity_id=5,
            score=0.75,
            rank=2,
            retrieval_rank=1,
            max_eval_similarity=-0.25,
            nearest_eval_id="oven/val/7",
            source="webdataset/00000.tar",
            meta_json="{}",
        ),
        Sample(
            # What the sanitised form of the key above would be: must stay a separate sample.
            key="laion_café_000002_jpg",
            image=png2,
            image_format="png",
            width=64,
            height=48,
            image_sha256=_sha(png2),
            url="https://example.org/other.png",
            caption="another picture",
            qid="Q9202",
            title="Statue of Liberty",
            entity_id=6,
            score=0.5,
            rank=1,
            retrieval_rank=2,
            max_eval_similarity=0.0,
            nearest_eval_id="",
            source="webdataset/00000.tar",
            meta_json=None,
        ),
        Sample(
            # Every nullable field None.
            key="nulls-3",
            image=jpeg2,
            image_format="jpg",
            width=None,
            height=None,
            image_sha256=_sha(jpeg2),
            url=None,
            caption="",
            qid="Q12418",
            title="Mona Lisa",
            entity_id=0,
            score=1.0,
            rank=3,
            retrieval_rank=10,
            max_eval_similarity=None,
            nearest_eval_id=None,
            source="",
            meta_json=None,
        ),
    ]


def assert_round_trip(rows: dict[str, dict], samples: list[Sample], reader: str):
    """rows: original key -> {field: value} as read back."""
    assert sorted(rows) == sorted(s.key for s in samples), reader
    for s in samples:
        got = rows[s.key]
        assert sorted(got) == sorted(FIELDS), (reader, s.key)
        for name in FIELDS:
            want, have = getattr(s, name), got[name]
            if want is None:
                assert have is None, (reader, s.key, name, have)
            elif BASE_TYPE[name] is float:
                assert np.float32(have) == np.float32(want), (reader, s.key, name, have, want)
            else:
                assert type(have) is BASE_TYPE[name] and have == want, (reader, s.key, name, have, want)


def write(tmp_path, samples, formats, num_shards=0, name="train"):
    """Runs WriteShards and checks the summary it returns against the files on disk."""
    out = str(tmp_path)

    def check_summary(summaries):
        by_format = {s["format"]: s["files"] for s in summaries}
        if len(summaries) != len(formats) or set(by_format) != set(formats):
            raise BeamAssertException(f"summaries {summaries} for formats {formats}")
        for fmt, files in by_format.items():
            on_disk = sorted(glob.glob(os.path.join(out, f"{name}-*.{EXTENSIONS[fmt]}")))
            if files != on_disk or not files:
                raise BeamAssertException(f"{fmt}: summary {files} != files {on_disk}")

    with direct_pipeline() as p:
        summaries = p | beam.Create(samples) | WriteShards(out, name, formats, num_shards=num_shards)
        assert_that(summaries, check_summary)
    return out


# --- independent readers -----------------------------------------------------------------


def read_parquet_pyarrow(files) -> dict[str, dict]:
    table = pq.read_table(files)
    for f in dataclasses.fields(Sample):
        assert table.schema.field(f.name).type == f.metadata["arrow"], f.name
    return {r["key"]: r for r in table.to_pylist()}


def read_parquet_duckdb(pattern) -> dict[str, dict]:
    import duckdb

    con = duckdb.connect()
    types = {row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{pattern}')").fetchall()}
    assert (types["image"], types["score"], types["entity_id"], types["width"]) == ("BLOB", "FLOAT", "BIGINT", "INTEGER")
    rel = con.execute(f"SELECT * FROM read_parquet('{pattern}')")
    cols = [d[0] for d in rel.description]
    return {r["key"]: r for r in (dict(zip(cols, row)) for row in rel.fetchall())}


def _masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecord_payloads(path) -> list[bytes]:
    """TFRecord framing: u64 length, masked crc32c(length), data, masked crc32c(data)."""
    with open(path, "rb") as f:
        data = f.read()
    payloads, pos = [], 0
    while pos < len(data):
        length_bytes = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert length_crc == _masked_crc32c(length_bytes), f"{path}@{pos}: bad length crc"
        payload = data[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert len(payload) == length and data_crc == _masked_crc32c(payload), f"{path}@{pos}: bad data crc"
        payloads.append(payload)
        pos += 16 + length
    assert pos == len(data), f"{path}: trailing bytes"
    return payloads


def example_to_row(payload: bytes) -> dict:
    from tfrecord import example_pb2  # generated by protoc, shares nothing with the writer

    features = example_pb2.Example.FromString(payload).features.feature
    assert sorted(features) == sorted(TF_NAME.values())
    row = {}
    for name, feature_name in TF_NAME.items():
        feature = features[feature_name]
        kind = TF_KIND[BASE_TYPE[name]]
        assert feature.WhichOneof("kind") == kind, (feature_name, feature.WhichOneof("kind"))
        values = list(getattr(feature, kind).value)
        if not values and name in NULLABLE:
            row[name] = None
            continue
        assert len(values) == 1, (feature_name, values)
        row[name] = values[0].decode("utf-8") if BASE_TYPE[name] is str else values[0]
    return row


def read_webdataset(files, samples) -> dict[str, dict]:
    import webdataset as wds

    formats = {s.key: s.image_format for s in samples}
    rows, member_keys = {}, []
    for item in wds.WebDataset(files, shardshuffle=False):
        member_key = item["__key__"]
        member_keys.append(member_key)
        assert "/" not in member_key and "." not in member_key, member_key
        meta = json.loads(item["json"].decode("utf-8"))
        assert "image" not in meta
        ext = formats[meta["key"]]
        assert sorted(k for k in item if not k.startswith("__")) == sorted([ext, "txt", "json"])
        assert item["txt"].decode("utf-8") == meta["title"]
        rows[meta["key"]] = {**meta, "image": item[ext]}
    assert len(member_keys) == len(set(member_keys)) == len(samples), member_keys
    for path in files:
        with open(path, "rb") as f:
            raw = f.read()
        # Whole 512-byte blocks, closed by the two zero blocks of the end-of-archive marker
        # (Python's tarfile would also read a tar without them; other tools complain).
        assert len(raw) % 512 == 0 and raw.endswith(b"\0" * 1024), path
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.isfile() and member.mtime == 0, member.name
    return rows


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", SHARD_FORMATS)
def test_every_field_round_trips(tmp_path, fmt):
    samples = make_samples()
    out = write(tmp_path, samples, (fmt,))
    files = sorted(glob.glob(os.path.join(out, f"train-*.{EXTENSIONS[fmt]}")))

    if fmt == "parquet":
        assert_round_trip(read_parquet_pyarrow(files), samples, "pyarrow")
        assert_round_trip(read_parquet_duckdb(os.path.join(out, "train-*.parquet")), samples, "duckdb")
    elif fmt == "tfrecord":
        rows = [example_to_row(p) for path in files for p in read_tfrecord_payloads(path)]
        assert len(rows) == len(samples)
        assert_round_trip({r["key"]: r for r in rows}, samples, "tfrecord")
    else:
        assert_round_trip(read_webdataset(files, samples), samples, "webdataset")


def test_tfrecord_parses_with_tensorflow(tmp_path):
    tf = pytest.importorskip("tensorflow")
    samples = make_samples()
    out = write(tmp_path, samples, ("tfrecord",))
    dtype = {"bytes_list": tf.string, "int64_list": tf.int64, "float_list": tf.float32}
    spec = {TF_NAME[n]: tf.io.VarLenFeature(dtype[TF_KIND[BASE_TYPE[n]]]) for n in FIELDS}
    rows = {}
    for record in tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(out, "train-*.tfrecord")))):
        parsed = tf.io.parse_single_example(record, spec)
        row = {}
        for name in FIELDS:
            values = tf.sparse.to_dense(parsed[TF_NAME[name]]).numpy().tolist()
            value = values[0] if values else None
            if BASE_TYPE[name] is str and value is not None:
                value = value.decode("utf-8")
            row[name] = value
        rows[row["key"]] = row
    assert_round_trip(rows, samples, "tensorflow")


def test_shard_names_and_summary_for_all_formats(tmp_path):
    samples = make_samples()
    out = write(tmp_path, samples, SHARD_FORMATS, num_shards=2, name="val")
    names = sorted(os.listdir(out))
    # Nothing but the shards: no temp folders or stray files left behind.
    assert len(names) == 2 * len(SHARD_FORMATS), names
    for name in names:
        assert re.fullmatch(r"val-\d{5}-of-\d{5}\.(parquet|tfrecord|tar)", name), name
    assert {n for n in names if n.endswith(".tar")} == {"val-00000-of-00002.tar", "val-00001-of-00002.tar"}
    # Split over two shards, every sample is still there exactly once.
    assert pq.read_table([os.path.join(out, n) for n in names if n.endswith(".parquet")]).num_rows == len(samples)
    tars = [os.path.join(out, n) for n in names if n.endswith(".tar")]
    assert sorted(read_webdataset(tars, samples)) == sorted(s.key for s in samples)


def test_parse_formats():
    assert parse_formats("tfrecord, parquet") == ("parquet", "tfrecord")
    assert parse_formats("webdataset,webdataset") == ("webdataset",)
    with pytest.raises(UsageError, match="--formats is empty"):
        parse_formats(" , ")
    with pytest.raises(UsageError) as e:
        parse_formats("parquet,csv", flag="--shard_formats")
    message = str(e.value)
    assert "--shard_formats" in message and "csv" in message
    assert all(f in message for f in SHARD_FORMATS)
    with pytest.raises(ValueError):
        WriteShards("/tmp/x", "train", ("parquet", "csv"))


def test_feature_spec_markdown_lists_every_feature():
    table = feature_spec_markdown(Sample)
    rows = table.strip().splitlines()[2:]
    assert len(rows) == len(FIELDS)
    assert "| `image/encoded` | bytes_list | `image` | no |" in table
    assert "| `entity/qid` | bytes_list | `qid` |" in table
    assert "| `image/width` | int64_list | `width` | yes" in table
    assert "| `retrieval/score` | float_list | `score` | no |" in table
    for row in rows:
        # A '|' inside a doc string must be escaped, or the row gets extra cells.
        assert len(re.findall(r"(?<!\\)\|", row)) == 6, row


def test_null_fields_encode_as_empty_lists_of_their_kind():
    from tfrecord import example_pb2

    sample = make_samples()[3]
    payload = encode_example(sample)
    example = example_pb2.Example.FromString(payload)
    for name in NULLABLE:
        feature = example.features.feature[TF_NAME[name]]
        kind = TF_KIND[BASE_TYPE[name]]
        assert feature.WhichOneof("kind") == kind, name
        assert len(getattr(feature, kind).value) == 0, name
    assert example_to_row(payload)["width"] is None
    # Same wire format: protoc's Example re-serializes our bytes unchanged.
    assert example.SerializeToString(deterministic=True) == payload


def test_encode_example_refuses_wrong_types():
    with pytest.raises(TypeError, match="entity_id"):
        encode_example(Sample(key="k", entity_id="12"))
    with pytest.raises(TypeError, match="rank"):
        encode_example(Sample(key="k", rank=1.5))
