"""SIGKILL at seeded points, then the same command again on the same output: for every
Beam pipeline that select_candidates' and refine's kill tests (test_kill_restart.py) do
not cover, the final output equals a clean run's (its keys or rows, its manifest's
counters), with nothing twice. A row per pipeline in the fault matrix."""

import glob
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import write_jsonl
from tests.faults.matrix import account, account_counts
from tests.helpers import draw_image, read_rejects, write_title_vocab, write_webdataset

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILLS = 2  # kill points per pipeline, seeded by its name


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", NO_GCE_CHECK="true", PYTHONPATH=ROOT)


def _kill_at(module: str, argv: list[str], out: str, delay: float) -> str:
    """Start the command; once it has touched its output folder (made it, or removed an
    earlier run's files from it), wait `delay` s and SIGKILL it. Returns what happened (a
    fast machine may finish first: the re-run must hold either way)."""
    started = time.time_ns()
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180

    def touched():
        try:
            return os.stat(out).st_mtime_ns >= started
        except OSError:
            return False

    while not touched() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        return f"finished ({proc.returncode}) before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return "killed"


def _counters(out) -> dict:
    m = json.load(open(os.path.join(out, "manifest.json")))
    return {k: v for k, v in m["counters"].items() if not k.startswith("shuffle_")}


def _build_entity_index(tmp_path, fixtures):
    from pipelines.demo_data.make_corpus import bundled

    def args(out):
        return ["--entities", bundled("entities.jsonl"), "--output", str(out)]

    def result(out):
        return sorted(pq.read_table(os.path.join(out, "entities.parquet"), columns=["qid"]).column("qid").to_pylist())

    return args, result, None


def _decontaminate(tmp_path, fixtures):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    meta = {"qid": "Q243", "title": "Eiffel Tower", "score": 0.7, "rank": 1, "entity_id": 0}
    for t in range(4):
        write_webdataset(corpus / f"{t:05d}.tar", [
            {"key": f"{t:05d}{i:04d}", "jpg": draw_image(t * 30 + i, size=(96, 72)), "txt": f"caption {i}",
             "json": {"key": f"{t:05d}{i:04d}", "url": f"http://x/{t}/{i}.jpg", "caption": f"caption {i}", **meta}}
            for i in range(30)])
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "copy.jpg").write_bytes(draw_image(0, size=(96, 72)))

    def args(out):
        return ["--input", str(corpus / "*.tar"), "--eval_images", str(evals), "--output", str(out), "--clip_model", "ViT-S-32",
                "--clip_pretrained", fixtures["clip"], "--threshold", "0.9999", "--formats", "parquet,webdataset",
                "--num_shards", "3"]

    def result(out):
        return sorted(pq.read_table(sorted(glob.glob(os.path.join(out, "samples-*.parquet"))), columns=["key"]).column("key").to_pylist())

    planted = {f"{t:05d}/{t:05d}{i:04d}": str(corpus / f"{t:05d}.tar") for t in range(4) for i in range(30)}
    return args, result, planted


def _oven_to_shards(tmp_path, fixtures):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(80):
        (images / f"oven_{i:05d}.jpg").write_bytes(draw_image(i, size=(96, 72)))
    lines = [{"data_id": f"d{i:05d}", "image_id": f"oven_{i:05d}", "question": "what is this?", "entity_id": "Q243",
              "data_split": "entity_train"} for i in range(80)]
    oven = write_jsonl(tmp_path / "oven.jsonl", lines)

    def args(out):
        return ["--oven", oven, "--images", str(images), "--output", str(out), "--formats", "parquet,tfrecord", "--num_shards", "3"]

    def result(out):
        return sorted(pq.read_table(sorted(glob.glob(os.path.join(out, "samples-*.parquet"))), columns=["key"]).column("key").to_pylist())

    return args, result, {f"d{i:05d}": oven for i in range(80)}


def _build_codes(tmp_path, fixtures):
    def args(out):
        return ["--entity_index", fixtures["entity_index"], "--tokenizer", fixtures["vocab"], "--output", str(out)]

    def result(out):
        return sorted(map(json.dumps, pq.read_table(os.path.join(out, "codes.parquet")).to_pylist()))

    return args, result, None


PIPELINES = {
    "build_entity_index": ("pipelines.build_entity_index", _build_entity_index),
    "decontaminate": ("pipelines.decontaminate", _decontaminate),
    "oven_to_shards": ("pipelines.oven_to_shards", _oven_to_shards),
    "build_codes": ("pipelines.build_codes", _build_codes),
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, entity_index, catalog_path):
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("kill_fixtures")
    torch.manual_seed(123)
    model, _, _ = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None)
    torch.save(model.state_dict(), root / "clip.pt")
    write_title_vocab(catalog_path, root / "vocab.txt")
    return {"clip": str(root / "clip.pt"), "vocab": str(root / "vocab.txt"), "entity_index": entity_index}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_sigkill_at_seeded_points_then_rerun_equals_a_clean_run(tmp_path, fixtures, name):
    module, make = PIPELINES[name]
    args, result, planted = make(tmp_path, fixtures)
    run = importlib.import_module(module).run
    clean = run(args(tmp_path / "clean"))
    assert clean["count_check"] == "ok"
    out = str(tmp_path / "out")
    rng = random.Random(name)
    happened = [_kill_at(module, args(out), out, rng.uniform(0.2, 2.5)) for _ in range(KILLS)]
    # (A run killed after its manifest was written, while it wrote its card, finished its data.)
    again = run(args(out))
    assert again["count_check"] == "ok", happened
    got, want = result(out), result(tmp_path / "clean")
    assert got == want and len(got) == len(set(got)), happened
    assert _counters(out) == _counters(tmp_path / "clean")
    left = [x for d, dirs, files in os.walk(out) for x in dirs + files if x.startswith("beam-temp-")]
    assert not left, left
    if planted:
        rejects = [r for r in read_rejects(out) if r.get("stage") != "eval_set"]
        row = account("sigkill_seeded_rerun", name, planted, got, rejects)
    else:
        row = account_counts("sigkill_seeded_rerun", name, len(want), len(got), [])
    row["fault"] = f"sigkill_{happened.count('killed')}_of_{KILLS}_rerun"  # kills that struck a running job
    assert row["lost"] == row["duplicated"] == 0, (row, happened)
