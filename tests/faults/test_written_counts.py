"""Every count identity that ends in files is checked against the files themselves: a
record dropped between a transform and its sink (here: a sink that writes one row less)
makes the run fail, naming the stage, instead of printing `count check: ok`.

Each case runs a pipeline twice on the same small input: as is (the check holds) and with
one record dropped right before the sink (the check fails with AccountingError)."""

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import decontaminate, oven_to_shards, refine, select_candidates
from tests.conftest import write_jsonl
from tests.fake_llm_server import FakeLLMServer
from tests.helpers import draw_image, write_parquet
from tests.test_refine import CASES, write_samples
from transforms.errors import AccountingError
from transforms.io import writers as shards_mod
from transforms.io import writers as sinks
from transforms.schema import Candidate, arrow_schema, to_row

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow


def _drop_first(pcoll, label):
    """Everything but the smallest key: a deterministic one-row loss."""

    def keep(items):
        items = sorted(items, key=lambda r: str(getattr(r, "key", r)))
        return items[1:]

    return pcoll | f"{label}All" >> beam.combiners.ToList() | f"{label}LoseOne" >> beam.FlatMap(keep)


def _select_args(tmp_path, entity_index, name):
    rows = [{"URL": f"http://x/{i}.jpg", "TEXT": t} for i, t in enumerate(
        ["Eiffel Tower at night", "Statue of Liberty from the ferry", "Taj Mahal at dawn", "", "kitchen cabinets"]
    )]
    captions = write_parquet(tmp_path / "captions.parquet", rows)
    return ["--entity_index", entity_index, "--captions", captions, "--output", str(tmp_path / name), "--k", "5", "--min_score", "0"]


def test_select_candidates_written_rows(tmp_path, entity_index, monkeypatch):
    ok = select_candidates.run(_select_args(tmp_path, entity_index, "ok"))
    assert ok["count_check"] == "ok" and ok["counters"]["written_candidates"] >= 2
    assert [f["format"] for f in ok["files"]] == ["parquet"]
    assert sum(x["rows"] for x in ok["files"][0]["files"]) == ok["counters"]["written_candidates"]
    original = sinks.WriteRecordsToParquet.expand
    monkeypatch.setattr(sinks.WriteRecordsToParquet, "expand", lambda self, r: original(self, _drop_first(r, "Lossy")))
    with pytest.raises(AccountingError, match=r"select: images kept \d+ != rows in the candidate files"):
        select_candidates.run(_select_args(tmp_path, entity_index, "lossy"))


def _oven(tmp_path, name):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(3):
        (images / f"oven_{i}.jpg").write_bytes(draw_image(i))
    lines = [{"data_id": f"d{i}", "image_id": f"oven_{i % 4}", "question": "what is this?", "entity_id": "Q243",
              "data_split": "entity_train"} for i in range(5)]
    oven = write_jsonl(tmp_path / "oven.jsonl", lines)
    return ["--oven", oven, "--images", str(images), "--output", str(tmp_path / name), "--formats", "parquet,webdataset"]


def test_oven_to_shards_written_rows_and_reject_lines(tmp_path, monkeypatch):
    ok = oven_to_shards.run(_oven(tmp_path, "ok"))
    c = ok["counters"]
    assert ok["count_check"] == "ok"
    assert c["written_samples_parquet"] == c["written_samples_webdataset"] == c["samples_built"] == 4
    assert c["rejects_emitted"] == c["written_rejects"] == 1  # d3: no image oven_3
    with monkeypatch.context() as m:
        original = shards_mod.WriteShards.expand
        m.setattr(shards_mod.WriteShards, "expand", lambda self, s: original(self, _drop_first(s, "Lossy")))
        with pytest.raises(AccountingError, match=r"write_shards: 4 samples to write != 3 rows in the parquet files"):
            oven_to_shards.run(_oven(tmp_path, "lossy"))
    original_reject = sinks._CountReject.process
    calls = {"n": 0}

    def lose_first(self, r):
        calls["n"] += 1
        out = list(original_reject(self, r))
        return out if calls["n"] > 1 else []

    monkeypatch.setattr(sinks._CountReject, "process", lose_first)
    with pytest.raises(AccountingError, match=r"write_rejects: 1 rejects emitted != 0 lines in the reject files"):
        oven_to_shards.run(_oven(tmp_path, "lossy_rejects"))


def test_refine_written_rows(tmp_path, catalog_path, entity_index, monkeypatch):
    inputs = write_samples(tmp_path / "samples.parquet", {k: CASES[k] for k in ("ok", "to_taj", "fenced")})

    def args(name):
        return ["--input", inputs, "--entities", catalog_path, "--entity_index", entity_index, "--output", str(tmp_path / name),
                "--model", "fake-vlm", "--cache", str(tmp_path / "cache"), "--formats", "parquet,webdataset",
                "--llm_backend", "openai", "--endpoint", server.url]

    with FakeLLMServer() as server:
        ok = refine.run(args("ok"))
    assert ok["count_check"] == "ok"
    refined = ok["counters"]["samples_refined"]
    assert refined >= 2 and ok["counters"]["written_samples_parquet"] == ok["counters"]["written_samples_webdataset"] == refined
    original = shards_mod.WriteShards.expand
    monkeypatch.setattr(shards_mod.WriteShards, "expand", lambda self, s: original(self, _drop_first(s, "Lossy")))
    with FakeLLMServer() as server, pytest.raises(AccountingError, match=rf"write_shards: {refined} samples to write != {refined - 1} rows"):
        refine.run(args("lossy"))


def test_decontaminate_written_rows(tmp_path, monkeypatch):
    cands = [Candidate(key=f"c{i}", qid=f"Q{i}", title=f"T{i}", caption="x", image=draw_image(i, size=(64, 64))) for i in range(4)]
    path = tmp_path / "candidates.parquet"
    pq.write_table(pa.Table.from_pylist([to_row(c) for c in cands], schema=arrow_schema(Candidate)), path)
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "e0.jpg").write_bytes(draw_image(100, size=(64, 64)))

    def args(name):
        return ["--input", str(path), "--eval_images", str(ev), "--output", str(tmp_path / name), "--clip_model", "ViT-S-32",
                "--clip_pretrained", "none", "--threshold", "0.999", "--formats", "parquet,tfrecord"]

    ok = decontaminate.run(args("ok"))
    assert ok["count_check"] == "ok" and ok["counters"]["written_samples_tfrecord"] == ok["counters"]["decontaminate_kept"] == 4
    original = shards_mod.WriteShards.expand
    monkeypatch.setattr(shards_mod.WriteShards, "expand", lambda self, s: original(self, _drop_first(s, "Lossy")))
    with pytest.raises(AccountingError, match=r"write_shards: 4 samples to write != 3 rows in the parquet files"):
        decontaminate.run(args("lossy"))


def test_build_entity_index_written_rows(tmp_path, catalog_path, monkeypatch):
    from pipelines import build_entity_index

    ok = build_entity_index.run(["--entities", catalog_path, "--output", str(tmp_path / "ok")])
    assert ok["count_check"] == "ok"
    embedded = ok["counters"]["entities_embedded"]
    original = pq.ParquetWriter.write_table
    lost = []

    def lose_last_row(self, table, *a, **kw):
        # The entity table's writer loses one row (once).
        if "summary" in table.column_names and table.num_rows > 1 and not lost:
            lost.append(1)
            table = table.slice(0, table.num_rows - 1)
        return original(self, table, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", lose_last_row)
    with pytest.raises(AccountingError, match=rf"finalize: {embedded} entities embedded != {embedded - 1} rows in entities.parquet"):
        build_entity_index.run(["--entities", catalog_path, "--output", str(tmp_path / "lossy")])
