"""Crash safety: a re-run on the same output starts clean (no shard of an earlier, killed
or differently sharded run survives next to the new ones), the manifest is written last
and lists exactly the files of the run, and a downstream pipeline refuses a folder whose
run did not finish, saying how to resume."""

import glob
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from pipelines import oven_to_shards, refine
from tests.conftest import write_jsonl
from tests.helpers import draw_image
from transforms.errors import UsageError
from transforms.run.manifest import check_finished_input

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow


def _oven_args(tmp_path, out, *extra):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(6):
        (images / f"oven_{i}.jpg").write_bytes(draw_image(i))
    lines = [{"data_id": f"d{i}", "image_id": f"oven_{i}", "question": "what is this?", "entity_id": "Q243",
              "data_split": "entity_train"} for i in range(6)]
    oven = write_jsonl(tmp_path / "oven.jsonl", lines)
    return ["--oven", oven, "--images", str(images), "--output", str(out), "--formats", "parquet", *extra]


def _keys(out):
    return sorted(r["key"] for r in pq.read_table(sorted(glob.glob(str(out / "samples-*.parquet")))).to_pylist())


def test_rerun_after_a_killed_run_has_no_duplicates(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = oven_to_shards.run(_oven_args(tmp_path, out, "--num_shards", "3"))
    assert len(glob.glob(str(out / "samples-*.parquet"))) == 3 and _keys(out) == [f"d{i}" for i in range(6)]
    # A killed run: shards of another sharding finalised, no manifest (it is written last).
    shutil.copy(sorted(glob.glob(str(out / "samples-*.parquet")))[0], out / "samples-00004-of-00007.parquet")
    os.remove(out / "manifest.json")
    with pytest.raises(UsageError, match=r"has no manifest.json.*re-run the pipeline .* --allow_unfinished_input"):
        check_finished_input(sorted(glob.glob(str(out / "samples-*"))), "--input")
    again = oven_to_shards.run(_oven_args(tmp_path, out, "--num_shards", "2"))
    files = sorted(os.path.basename(p) for p in glob.glob(str(out / "samples-*")))
    assert files == ["samples-00000-of-00002.parquet", "samples-00001-of-00002.parquet"]
    assert _keys(out) == [f"d{i}" for i in range(6)]  # nothing twice
    listed = sorted(f["path"] for entry in again["files"] for f in entry["files"])
    assert listed == files and sum(f["rows"] for e in again["files"] for f in e["files"]) == 6
    assert json.load(open(out / "manifest.json"))["files"] == again["files"] != first["files"]
    assert check_finished_input(sorted(glob.glob(str(out / "samples-*"))), "--input") == []


def test_downstream_refuses_files_its_manifest_does_not_list(tmp_path, catalog_path, entity_index):
    out = tmp_path / "shards"
    oven_to_shards.run(_oven_args(tmp_path, out, "--num_shards", "2"))
    stale = out / "samples-00003-of-00004.parquet"
    shutil.copy(glob.glob(str(out / "samples-*.parquet"))[0], stale)
    args = ["--input", str(out / "samples-*.parquet"), "--entities", catalog_path, "--entity_index", entity_index,
            "--output", str(tmp_path / "rew"), "--model", "m", "--llm_backend", "replay", "--cache", str(tmp_path / "c")]
    with pytest.raises(UsageError, match=r"--input: .* does not match its manifest.json: 1 file\(s\) its manifest does not list"):
        refine.run(args)
    # A listed file that went missing is refused too.
    os.remove(stale)
    victim = sorted(glob.glob(str(out / "samples-*.parquet")))[0]
    os.rename(victim, tmp_path / "moved.parquet")
    with pytest.raises(UsageError, match=r"1 listed file\(s\) missing"):
        check_finished_input(sorted(glob.glob(str(out / "samples-*"))), "--input")
    # The user can still say: read it anyway.
    warnings = check_finished_input([str(tmp_path / "x" / "samples-00000-of-00001.parquet")], "--input", allow_unfinished=True)
    assert warnings and "--allow_unfinished_input" in warnings[0]


def test_other_tools_files_are_not_checked(tmp_path):
    # img2dataset names shards 00000.tar: no manifest of ours is expected there.
    assert check_finished_input([str(tmp_path / "00000.tar"), str(tmp_path / "00001.parquet")], "--input") == []
