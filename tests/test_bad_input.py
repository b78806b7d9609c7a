"""Every kind of bad input ends in rejected/<stage>/ with its reason, nothing crashes, and
the counters add up."""

import gzip
import json

import pyarrow as pa
import pytest

from pipelines import build_entity_index, select_candidates
from tests.conftest import CATALOG
from tests.helpers import draw_image, read_candidates, read_rejects, write_parquet, write_webdataset


def _by_reason(rejects):
    out = {}
    for r in rejects:
        out.setdefault(r["reason"], []).append(r)
    return out


def test_laion_parquet_bad_rows_and_files(tmp_path, entity_index):
    good = write_parquet(
        tmp_path / "good.parquet",
        [
            {"URL": "http://e/1.jpg", "TEXT": "The Eiffel Tower at night", "WIDTH": 800, "HEIGHT": 600},
            {"URL": "http://e/2.jpg", "TEXT": "", "WIDTH": 1, "HEIGHT": 1},
            {"URL": "http://e/3.jpg", "TEXT": None, "WIDTH": 1, "HEIGHT": 1},
            {"URL": "http://e/4.jpg", "TEXT": "   \t ", "WIDTH": 1, "HEIGHT": 1},
            {"URL": "http://e/5.jpg", "TEXT": "Colosseum " * 300, "WIDTH": 1, "HEIGHT": 1},
            {"URL": None, "TEXT": "a caption without url or key", "WIDTH": 1, "HEIGHT": 1},
        ],
        row_group_size=2,
    )
    # A caption column of bytes, one row not UTF-8.
    binary = write_parquet(
        tmp_path / "binary.parquet",
        table=pa.table(
            {
                "URL": ["http://e/6.jpg", "http://e/7.jpg"],
                "TEXT": pa.array([b"Golden Gate Bridge in fog", b"caf\xe9 \xff\xfe"], pa.binary()),
            }
        ),
    )
    numeric = write_parquet(tmp_path / "numeric.parquet", [{"URL": "http://e/8.jpg", "TEXT": 12345}])
    write_parquet(
        tmp_path / "no_text.parquet", [{"URL": "http://e/9.jpg", "caption_en": "x"}, {"URL": "http://e/10.jpg", "caption_en": "y"}]
    )
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    out = tmp_path / "out"
    summary = select_candidates.run(
        [
            "--entity_index", entity_index,
            "--captions", str(tmp_path / "*.parquet"),
            "--k", "3",
            "--max_caption_chars", "1000",
            "--output", str(out),
        ]
    )
    reasons = _by_reason(read_rejects(out))
    assert len(reasons["empty_caption"]) == 3
    assert reasons["caption_too_long"][0]["detail"].startswith("2999 chars")
    assert [r["source"] for r in reasons["missing_key"]] == [f"{good}#rg2"]
    assert len(reasons["bad_utf8"]) == 1 and reasons["bad_utf8"][0]["source"].startswith(binary)
    assert reasons["non_text_caption"][0]["source"].startswith(numeric)
    assert reasons["missing_column"][0]["count"] == 2 and "--text_col" in reasons["missing_column"][0]["detail"]
    assert reasons["unreadable_file"][0]["source"].endswith("corrupt.parquet")
    c = summary["counters"]
    # corrupt.parquet could not be read at all: the check says so instead of "ok".
    assert summary["count_check"].startswith("incomplete: 1 input file(s)") and "read_captions_unreadable_file: 1" in summary["count_check"]
    assert summary["incomplete_files"] == {"read_captions_unreadable_file": 1}
    # 6 + 2 + 1 + 2 rows; the corrupt file has no readable rows.
    assert c["captions_rows_read"] == 11
    assert c["captions_rows_ok"] == 2
    assert c["rejected_read_captions_unreadable_file_files"] == 1
    titles = {r["caption"]: r["title"] for r in read_candidates(out)}
    assert titles == {"The Eiffel Tower at night": "Eiffel Tower", "Golden Gate Bridge in fog": "Golden Gate Bridge"}


def test_webdataset_bad_samples_and_truncated_archive(tmp_path, entity_index):
    ok = [
        {"key": "000001", "jpg": draw_image(1), "txt": "Mona Lisa painting in the Louvre", "json": {"url": "http://w/1.jpg", "key": "000001"}},
        {"key": "000002", "jpg": draw_image(2), "txt": b"Big Ben \xff clock", "json": {"url": "http://w/2.jpg"}},
        {"key": "000003", "jpg": draw_image(3), "json": {"url": "http://w/3.jpg", "caption": "Taj Mahal at sunrise"}},
        {"key": "000004", "jpg": draw_image(4), "txt": "", "json": {"url": "http://w/4.jpg"}},
    ]
    write_webdataset(tmp_path / "shard-00000.tar", ok)
    big = [{"key": f"1{i:05d}", "jpg": draw_image(10 + i, size=(128, 128)), "txt": "Mount Everest summit"} for i in range(6)]
    full = write_webdataset(tmp_path / "full.tmp", big)
    size = len(open(full, "rb").read())
    write_webdataset(tmp_path / "shard-00001.tar", big, truncate_at=size // 2)
    out = tmp_path / "out"
    summary = select_candidates.run(
        [
            "--entity_index", entity_index,
            "--captions", str(tmp_path / "shard-*.tar"),
            "--caption_format", "webdataset",
            "--k", "5",
            "--output", str(out),
        ]
    )
    reasons = _by_reason(read_rejects(out))
    assert [r["key"] for r in reasons["bad_utf8"]] == ["shard-00000/000002"]
    assert [r["key"] for r in reasons["empty_caption"]] == ["shard-00000/000004"]
    broken = reasons["broken_archive"][0]
    assert broken["source"].endswith("shard-00001.tar") and broken["detail"].startswith("after ")
    assert summary["count_check"].startswith("incomplete: 1 input file(s)"), summary["count_check"]
    assert summary["incomplete_files"] == {"read_captions_broken_archive": 1}
    rows = read_candidates(out)
    by_key = {r["key"]: r for r in rows}
    assert by_key["shard-00000/000001"]["title"] == "Mona Lisa"
    assert by_key["shard-00000/000003"]["title"] == "Taj Mahal"
    # Images are carried over byte for byte.
    assert by_key["shard-00000/000001"]["image"] == ok[0]["jpg"]
    # The samples read before the archive broke are kept, not lost.
    n_before_break = int(broken["detail"].split()[1])
    assert n_before_break >= 1
    everest = [r for r in rows if r["title"] == "Mount Everest"]
    assert len(everest) == n_before_break
    assert summary["counters"]["captions_rows_read"] == 4 + n_before_break


def test_catalog_bad_rows_gzip_and_parquet(tmp_path):
    lines = [json.dumps(r) for r in CATALOG[:4]] + [
        "{not json",
        json.dumps({"wikipedia_title": "no qid"}),
        json.dumps({"wikidata_id": "Q5", "wikipedia_title": ""}),
        json.dumps({"wikidata_id": 7, "wikipedia_title": "numeric qid"}),
        json.dumps(["a", "list"]),
        json.dumps(CATALOG[0]),
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"wikidata_id": "Q6", "wikipedia_title": "\xff"}\n'
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(raw)
    write_parquet(
        tmp_path / "b.parquet",
        [{"wikidata_id": "Q146", "wikipedia_title": "Cat", "wikipedia_summary": None, "pageviews": 10}],
    )
    write_parquet(tmp_path / "c.parquet", [{"qid": "Q1", "name": "Universe"}])
    out = tmp_path / "idx"
    manifest = build_entity_index.run(["--entities", str(tmp_path / "*"), "--output", str(out)])
    reasons = _by_reason(read_rejects(out))
    assert {k: len(v) for k, v in reasons.items()} == {
        "bad_json": 1,
        "missing_field": 1,
        "empty_title": 1,
        "non_text_field": 1,
        "not_an_object": 1,
        "duplicate_qid": 1,
        "bad_utf8": 1,
        "missing_column": 1,
    }
    assert reasons["missing_field"][0]["detail"] == "row 5: missing wikidata_id"
    assert manifest["count_check"] == "ok", manifest["count_check"]
    import pyarrow.parquet as pq

    table = pq.read_table(out / "entities.parquet").to_pylist()
    # Int ids follow file order (a.jsonl.gz before b.parquet), duplicates collapsed.
    assert [(r["int_id"], r["qid"]) for r in table] == [
        (0, "Q243"), (1, "Q9202"), (2, "Q9141"), (3, "Q513"), (4, "Q146"),
    ]
    assert json.loads(table[4]["extra_json"]) == {"pageviews": 10}


def test_missing_catalog_is_a_usage_error(tmp_path):
    from transforms.errors import UsageError

    with pytest.raises(UsageError, match="--entities: no file matches"):
        build_entity_index.run(["--entities", str(tmp_path / "nope*.jsonl"), "--output", str(tmp_path / "o")])


def test_failed_model_batches_become_rejects_per_record():
    """RunInference's dead-letter output -> one Reject per record of the failed batch."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
    from apache_beam.testing.util import assert_that, equal_to

    from tests.conftest import direct_pipeline
    from transforms.io.writers import DeadLetters
    from transforms.schema import Caption

    class Model:
        pass

    class Exploding(ModelHandler):
        def __init__(self):
            super().__init__(min_batch_size=2, max_batch_size=2)

        def load_model(self):
            return Model()

        def run_inference(self, batch, model, inference_args=None):
            if any("boom" in t for t in batch):
                raise RuntimeError("model crashed")
            return [PredictionResult(t, len(t)) for t in batch]

    caps = [Caption(key=f"k{i}", caption=t, source="s") for i, t in enumerate(["a", "boom", "c", "d"])]
    with direct_pipeline() as p:
        main, dlq = (
            p
            | beam.Create(caps, reshuffle=False)
            | beam.Map(lambda c: (c, c.caption))
            | RunInference(KeyedModelHandler(Exploding())).with_exception_handling()
        )
        rejects = dlq.failed_inferences | beam.ParDo(DeadLetters("embed", "embed_failed"))
        ok = main | beam.Map(lambda kv: kv[0].key)
        failed = rejects | beam.Map(lambda r: (r.key, r.reason, "model crashed" in r.detail))
        # Batches of two: the batch holding "boom" fails as a whole, record by record.
        assert_that(failed | beam.Map(lambda x: (x[1], x[2])), equal_to([("embed_failed", True)] * 2), label="rejects")
        assert_that(
            (ok, failed | beam.Map(lambda x: x[0])) | beam.Flatten() | beam.combiners.Count.Globally(),
            equal_to([4]),
            label="all accounted",
        )
