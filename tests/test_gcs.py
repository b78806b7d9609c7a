"""gs:// paths end to end, against a local GCS emulator on loopback (no cloud, no auth)."""

import glob
import os

import pyarrow.parquet as pq
import pytest

from tests.conftest import CATALOG
from tests.helpers import draw_image, write_webdataset

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

def _upload(local, remote):
    from apache_beam.io.filesystems import FileSystems

    with open(local, "rb") as src, FileSystems.create(remote) as dst:
        dst.write(src.read())


def test_pipelines_read_and_write_gcs(tmp_path, gcs):
    import json

    from apache_beam.io.filesystems import FileSystems

    from pipelines import build_entity_index, select_candidates

    cat = tmp_path / "entities.jsonl"
    cat.write_text("".join(json.dumps(r) + "\n" for r in CATALOG))
    _upload(cat, f"{gcs}/catalog/entities.jsonl")
    write_webdataset(
        tmp_path / "s.tar",
        [
            {"key": "a", "jpg": draw_image(1), "txt": "Eiffel Tower at dusk"},
            {"key": "b", "jpg": draw_image(2), "txt": "Taj Mahal garden"},
        ],
    )
    _upload(tmp_path / "s.tar", f"{gcs}/wds/shard-00000.tar")

    manifest = build_entity_index.run(["--entities", f"{gcs}/catalog/*.jsonl", "--output", f"{gcs}/index"])
    assert manifest["num_entities"] == 16
    assert FileSystems.exists(f"{gcs}/index/entities.faiss")
    summary = select_candidates.run(
        ["--entity_index", f"{gcs}/index", "--captions", f"{gcs}/wds/*.tar",
         "--caption_format", "webdataset", "--output", f"{gcs}/cands"]
    )
    assert summary["count_check"] == "ok"
    files = [m.path for m in FileSystems.match([f"{gcs}/cands/candidates-*.parquet"])[0].metadata_list]
    assert files
    rows = []
    for i, path in enumerate(files):
        local = tmp_path / f"c{i}.parquet"
        with FileSystems.open(path) as f:
            local.write_bytes(f.read())
        rows += pq.read_table(local).to_pylist()
    # Keys are qualified by their shard (the image identity rule), on gs:// as locally.
    assert {(r["key"], r["title"]) for r in rows} == {("shard-00000/a", "Eiffel Tower"), ("shard-00000/b", "Taj Mahal")}
    assert not glob.glob(os.path.join(str(tmp_path), "index*"))  # nothing was written locally


def test_trainer_streams_shards_and_codes_from_gcs(tmp_path, gcs):
    """trainer.train with --train and --codes on gs:// (shards in all three formats), the
    data-loader worker reading through Beam's GCS filesystem."""
    import apache_beam as beam
    from tokenizers import BertWordPieceTokenizer

    from pipelines import build_codes
    from tests.conftest import direct_pipeline, write_jsonl
    from trainer import train
    from transforms.io.writers import WriteShards
    from transforms.schema import Sample

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator([e["wikipedia_title"].lower() for e in CATALOG] + ["what is the main object?"] * 3, vocab_size=200)
    tok.save_model(str(tmp_path))
    catalog = write_jsonl(tmp_path / "entities.jsonl", CATALOG)
    build_codes.run(["--entities", catalog, "--tokenizer", str(tmp_path / "vocab.txt"), "--output", f"{gcs}/codes"])
    samples = [Sample(key=f"k{i}", image=draw_image(i), image_format="jpg", qid=CATALOG[i % 5]["wikidata_id"],
                      title=CATALOG[i % 5]["wikipedia_title"]) for i in range(20)]
    with direct_pipeline() as p:
        _ = p | beam.Create(samples) | WriteShards(f"{gcs}/train", "samples", ["parquet", "tfrecord", "webdataset"], num_shards=2)
    summary = train.run([
        "--train", f"{gcs}/train/samples-*", "--codes", f"{gcs}/codes", "--output", str(tmp_path / "run"),
        "--model_config", "tiny", "--max_steps", "3", "--batch_size", "4", "--num_workers", "1", "--crop", "center",
        "--task_weights", "entity=1", "--shuffle_buffer", "8",
    ])
    assert summary["steps"] == 3 and summary["skipped_total"] == 0
    assert os.path.exists(os.path.join(summary["checkpoint"], "codes.parquet"))


def test_llm_cache_on_gcs_survives_read_errors_without_paying_twice(tmp_path, gcs, catalog_path, entity_index, monkeypatch):
    """refine's response cache on gs://: answers written in batched segments, compacted and
    read back by hash on a second run while the emulator fails the first downloads of
    cache objects (a 503, then a dropped connection): the errors are retried, never taken
    for a miss, so the second run sends nothing."""
    from gcp_storage_emulator import server as gserver

    from pipelines import refine
    from tests.fake_llm_server import FakeLLMServer
    from tests.test_refine import CASES, base_args, write_samples

    cases = {k: CASES[k] for k in ("ok", "to_taj", "to_mercury")} | {f"p{i}": ("Q243", f"tower photo {i}") for i in range(5)}
    inputs = write_samples(tmp_path / "s.parquet", cases)
    cache = f"{gcs}/llm-cache"
    with FakeLLMServer() as first:
        one = refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "o1", cache)
                         + ["--llm_backend", "openai", "--endpoint", first.url])
        paid = sum(first.answered.values())
    assert one["count_check"] == "ok" and paid == one["requests_sent"] > 8

    original = gserver.RequestHandler.do_GET
    injected = []

    def flaky_get(self):
        media = "alt=media" in self.path and "llm-cache" in self.path
        if media and len(injected) < 4:
            injected.append(self.path)
            if len(injected) % 2:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.close_connection = True
                self.connection.close()  # dropped mid-request
            return
        return original(self)

    monkeypatch.setattr(gserver.RequestHandler, "do_GET", flaky_get)
    with FakeLLMServer() as second:
        two = refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "o2", cache)
                         + ["--llm_backend", "openai", "--endpoint", second.url])
        resent = len(second.requests)
    assert len(injected) == 4, injected
    assert two["count_check"] == "ok" and resent == 0 and two["cache_hits"] == paid
    assert two["counters"]["samples_refined"] == one["counters"]["samples_refined"]
