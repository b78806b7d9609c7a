"""pipelines.oven_to_shards: OVEN annotations + images -> training shards that
trainer.train --stage finetune reads with the annotations' own questions."""

import glob
import json
import os

import pyarrow.parquet as pq

from pipelines import oven_to_shards
from tests.conftest import write_jsonl
from tests.helpers import draw_image, read_rejects


def test_oven_annotations_become_shards_and_every_line_is_accounted_for(tmp_path, catalog_path):
    images = tmp_path / "images"
    (images / "00").mkdir(parents=True)
    (images / "00" / "oven_001.jpg").write_bytes(draw_image(1))
    (images / "oven_002.png").write_bytes(draw_image(2, fmt="PNG"))
    (images / "00" / "oven_003.jpg").write_bytes(b"not an image")
    lines = [
        {"data_id": "e1", "image_id": "oven_001", "question": "what is this building?", "entity_id": "Q243",
         "entity_text": "Eiffel Tower", "data_split": "entity_train"},
        {"data_id": "q1", "image_id": "oven_001", "question": "which tower is this?", "entity_id": "Q243",
         "entity_text": "Eiffel Tower", "data_split": "query_train"},
        {"data_id": "e2", "image_id": "oven_002", "question": "what is this?", "entity_id": "Q146", "entity_text": "cat",
         "data_split": "entity_train"},
        {"data_id": "e3", "image_id": "oven_003", "question": "what?", "entity_id": "Q144", "data_split": "entity_train"},
        {"data_id": "e4", "image_id": "oven_404", "question": "what?", "entity_id": "Q144", "data_split": "entity_train"},
        {"data_id": "v1", "image_id": "oven_001", "question": "what?", "entity_id": "Q243", "data_split": "entity_val_seen"},
        {"image_id": "oven_001", "entity_id": "Q243"},
    ]
    oven = write_jsonl(tmp_path / "oven_train.jsonl", lines)
    with open(oven, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    out = tmp_path / "shards"
    summary = oven_to_shards.run([
        "--oven", oven, "--images", str(images), "--output", str(out), "--entities", catalog_path,
        "--splits", "entity_train,query_train", "--formats", "parquet,tfrecord",
    ])
    assert summary["count_check"] == "ok", summary["count_check"]
    rows = {r["key"]: r for r in pq.read_table(glob.glob(str(out / "samples-*.parquet"))).to_pylist()}
    assert set(rows) == {"e1", "q1", "e2"}
    assert rows["e1"]["image"] == rows["q1"]["image"] == draw_image(1)
    assert json.loads(rows["q1"]["meta_json"])["question"] == "which tower is this?"
    assert rows["e2"]["title"] == "Cat" and rows["e2"]["image_format"] == "png"  # catalog title wins
    rejects = {}
    for r in read_rejects(out):
        rejects.setdefault(r["reason"], []).append(r["key"])
    assert sorted(rejects["image_missing"]) == ["e4"]
    assert rejects["split_not_selected"] == ["v1"]
    assert len(rejects["bad_annotation"]) == 2
    assert "not_an_image" in rejects
    assert glob.glob(str(out / "samples-*.tfrecord"))


def test_missing_images_folder_is_a_usage_error(tmp_path):
    import pytest

    from transforms.errors import UsageError

    oven = write_jsonl(tmp_path / "o.jsonl", [{"data_id": "a", "image_id": "b", "entity_id": "Q1"}])
    with pytest.raises(UsageError, match="--images"):
        oven_to_shards.run(["--oven", oven, "--images", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")
