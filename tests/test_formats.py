"""One home per format: every stage and the trainer read a shard through the same rules
(image members, key, damage), the format modules import without Beam, and inputs the
old per-stage readers disagreed on (.jpeg members, .tar.gz shards, .tfrecord.gz,
object-store folders) read the same everywhere."""

import gzip
import io
import json
import subprocess
import sys
import tarfile

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from tests.conftest import direct_pipeline
from tests.helpers import draw_image, write_parquet
from transforms.formats import keys, media, shards, tfrecord, webdataset
from transforms.formats.files import Skip
from transforms.formats.tf_example import encode_example
from transforms.io.readers import REJECTED, CaptionColumns, ReadWebDatasetCaptions, ShardUnits
from transforms.schema import Candidate, Sample
from transforms.stages.decontaminate import ReadCandidateImages
from transforms.stages.refine import Located, ReadSamples


def _sample(i: int) -> Sample:
    return Sample(key=f"k{i}", image=draw_image(i), image_format="jpg", caption=f"caption {i}", qid=f"Q{i + 1}", title=f"T{i}")


def _write_tar(path, members, gz=False):
    """members: (name, bytes) in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gz else data)
    return str(path)


def _shard_members(samples, image_ext):
    out = []
    for s in samples:
        meta = {k: v for k, v in s.__dict__.items() if k != "image"}
        out += [(f"{s.key}.{image_ext}", s.image), (f"{s.key}.json", json.dumps(meta).encode())]
    return out


def _split(outputs):
    main, rejects = [], []
    for o in outputs:
        (rejects if isinstance(o, beam.pvalue.TaggedOutput) else main).append(o.value if isinstance(o, beam.pvalue.TaggedOutput) else o)
    return main, rejects


def test_the_core_imports_without_beam():
    """The trainer, the entity-code algorithms, the formats, the records and the errors are
    the core other tools build on: importing them loads no Beam."""
    code = (
        "import sys\n"
        "import transforms.formats.shards, transforms.formats.keys, transforms.formats.media, transforms.formats.files\n"
        "import transforms.formats.webdataset, transforms.formats.parquet, transforms.formats.tfrecord\n"
        "import transforms.formats.safe_json, transforms.formats.text\n"
        "import transforms.codes.ald, transforms.codes.rq, transforms.schema, transforms.errors, transforms.run.cli, transforms.run.version, transforms.io.images\n"
        "import transforms.report.card, transforms.report.viewer, transforms.report.outputs, trainer.checkpoints\n"
        "import trainer.train, trainer.predict, trainer.score, trainer.data, trainer.model, trainer.codebook\n"
        "import trainer.contrastive, trainer.contrastive_predict, trainer.contrastive_model, trainer.visual_matching\n"
        "bad = sorted(m for m in sys.modules if m.startswith('apache_beam'))\n"
        "assert not bad, bad[:5]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_reader_finds_the_same_image_member(tmp_path):
    """A .jpeg (or .tiff, .jfif) image member: refine's reader once knew only jpg/png/...,
    the trainer another list; now one list decides for all of them."""
    samples = [_sample(i) for i in range(3)]
    for ext in ("jpeg", "tiff", "jfif"):
        path = _write_tar(tmp_path / f"shard-{ext}.tar", _shard_members(samples, ext))
        # Trainer: image bytes read.
        rows = [r for r in shards.iter_shard_records((path, -1))]
        assert [r.row["image"] for r in rows] == [s.image for s in samples]
        # refine: the image is located, then read back by one ranged read.
        located, rejects = _split(ReadSamples().process(path))
        assert not rejects and all(isinstance(x, Located) for x in located)
        got, missing = shards.read_images_at(path, [x.ref for x in located], "image")
        assert not missing and [got[x.ref] for x in located] == [s.image for s in samples]
        # decontaminate: candidates with their image bytes and qualified keys.
        cands, rejects = _split(ReadCandidateImages(root=str(tmp_path) + "/").process(path))
        assert not rejects and all(isinstance(c, Candidate) for c in cands)
        assert [c.image for c in cands] == [s.image for s in samples]
        assert [c.key for c in cands] == [f"shard-{ext}/{s.key}" for s in samples]
        # select_candidates' caption pass: image located, not read.
        caps, rejects = _split(ReadWebDatasetCaptions(CaptionColumns(), 1000, str(tmp_path) + "/").process(path))
        assert not rejects and all(c.image_ref and c.image_ref.startswith("t:") for c in caps)
    assert media.mime_type("JPEG") == media.mime_type(".jfif") == "image/jpeg" and media.mime_type("tif") == "image/tiff"
    assert all(media.is_image_file(f"a/b{s}") for s in media.IMAGE_SUFFIXES) and not media.is_image_file("a.json")


def test_damaged_tar_keeps_samples_before_damage_in_every_reader(tmp_path):
    samples = [_sample(i) for i in range(4)]
    good = tmp_path / "good.tar"
    _write_tar(good, _shard_members(samples, "jpg"))
    data = good.read_bytes()
    # Cut inside the third sample's image member.
    cut = data.index(b"k2.jpg") + 512 + 10
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[:cut])
    out = list(shards.iter_shard_records((str(bad), -1)))
    assert [o.row["key"] for o in out if not isinstance(o, Skip)] == ["k0", "k1"]
    assert isinstance(out[-1], Skip) and out[-1].reason == "broken_archive"
    located, rejects = _split(ReadSamples().process(str(bad)))
    assert [x.sample.key for x in located] == ["k0", "k1"]
    assert [r.reason for r in rejects] == ["broken_archive"]
    cands, rejects = _split(ReadCandidateImages(root=str(tmp_path) + "/").process(str(bad)))
    assert [c.key for c in cands] == ["bad/k0", "bad/k1"] and [r.reason for r in rejects] == ["broken_archive"]


def test_bad_json_is_one_reject_not_a_lost_file(tmp_path):
    samples = [_sample(i) for i in range(3)]
    members = _shard_members(samples, "jpg")
    members[3] = ("k1.json", b"{not json")
    path = _write_tar(tmp_path / "s.tar", members)
    out = list(shards.iter_shard_records((path, -1), locate_images=True))
    assert [type(o).__name__ for o in out] == ["ShardRecord", "Skip", "ShardRecord"] and out[1].reason == "bad_json"
    located, rejects = _split(ReadSamples().process(path))
    assert [x.sample.key for x in located] == ["k0", "k2"] and [r.reason for r in rejects] == ["bad_json"]
    assert rejects[0].source == path


def test_compressed_shards_read_like_plain_ones(tmp_path):
    from trainer.data import iter_unit, list_units

    samples = [_sample(i) for i in range(3)]
    tgz = _write_tar(tmp_path / "s.tar.gz", _shard_members(samples, "png"), gz=True)
    assert shards.shard_kind(tgz) == "webdataset" and webdataset.is_tar(tgz)
    rows = [r for r in iter_unit((tgz, -1))]
    assert [r["image"] for r in rows] == [s.image for s in samples]
    # Located in the decompressed stream, read back through it.
    located, _ = _split(ReadSamples().process(tgz))
    got, missing = shards.read_images_at(tgz, [x.ref for x in located], "image")
    assert not missing and [got[x.ref] for x in located] == [s.image for s in samples]
    # A gzipped TFRecord: the trainer once unzipped it twice.
    tfr = tmp_path / "s.tfrecord.gz"
    with gzip.open(tfr, "wb") as f:
        for s in samples:
            f.write(tfrecord.frame(encode_example(s)))
    assert list_units(str(tfr)) == [(str(tfr), -1)]
    rows = list(iter_unit((str(tfr), -1)))
    assert [(r["key"], r["qid"], r["image"]) for r in rows] == [(s.key, s.qid, s.image) for s in samples]


def test_shard_units_route_compressed_tars_to_the_tar_reader(tmp_path):
    pq_path = write_parquet(tmp_path / "a.parquet", [s.__dict__ for s in (_sample(0), _sample(1))], row_group_size=1)
    tgz = _write_tar(tmp_path / "b.tar.gz", _shard_members([_sample(2)], "jpg"), gz=True)
    with direct_pipeline() as p:
        units, rejects = p | ShardUnits(str(tmp_path), has_parquet=True, has_tars=True)
        assert_that(units, equal_to([(pq_path, 0), (pq_path, 1), tgz]), label="units")
        assert_that(rejects, equal_to([]), label="rejects")
    assert REJECTED == "rejected"


def test_object_store_folder_is_expanded():
    assert keys.expand_patterns("gs://bucket/run1/") == ["gs://bucket/run1/*"]
    assert keys.expand_patterns("gs://bucket/run1/*.tar,gs://b/x.parquet") == ["gs://bucket/run1/*.tar", "gs://b/x.parquet"]


def test_count_records_reads_back_what_each_format_holds(tmp_path):
    samples = [_sample(i) for i in range(5)]
    tar = _write_tar(tmp_path / "s-00000-of-00001.tar", _shard_members(samples, "jpg"))
    pqf = write_parquet(tmp_path / "s-00000-of-00001.parquet", [s.__dict__ for s in samples], row_group_size=2)
    tfr = tmp_path / "s-00000-of-00001.tfrecord"
    data = b"".join(tfrecord.frame(encode_example(s)) for s in samples)
    tfr.write_bytes(data)
    cut = tmp_path / "cut-00000-of-00001.tfrecord"
    cut.write_bytes(data[:-10])  # the last frame cut short: not counted
    lines = tmp_path / "rejects-00000-of-00001.jsonl"
    lines.write_text('{"a": 1}\n{"a": 2}\n{"a": 3}')  # no newline at the end: still 3
    assert [shards.count_records(str(p)) for p in (tar, pqf, tfr, cut, lines)] == [5, 5, 5, 4, 3]
