"""SIGKILL the contrastive trainer and its predictor at seeded points, then run the same
command again: the trainer resumes from the last checkpoint it published (never from
step 0, never from a half-written one) and trains to the end; the predictor's output
equals an undisturbed run's. Rows in the fault matrix."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CATALOG, direct_pipeline, write_jsonl
from tests.faults.matrix import account, account_counts
from tests.helpers import draw_image

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTITIES = [(e["wikidata_id"], e["wikipedia_title"]) for e in CATALOG[:8]]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", NO_GCE_CHECK="true", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import apache_beam as beam

    from transforms.io.writers import WriteShards
    from transforms.schema import Sample

    root = tmp_path_factory.mktemp("kill_ctr")
    samples = [Sample(key=f"{q}-{i}", image=draw_image(j * 40 + i % 2), image_format="jpg", qid=q, title=t)
               for j, (q, t) in enumerate(ENTITIES) for i in range(6)]
    with direct_pipeline() as p:
        _ = p | beam.Create(samples) | WriteShards(str(root / "shards"), "samples", ["parquet"], num_shards=2)
    return {"root": root, "shards": str(root / "shards" / "samples-*.parquet"), "catalog": write_jsonl(root / "entities.jsonl", CATALOG)}


def _train_args(shards, out, steps):
    return ["--train", shards["shards"], "--entities", shards["catalog"], "--output", str(out), "--clip_model", "ViT-S-32",
            "--batch_size", "8", "--lr", "2e-3", "--warmup_steps", "2", "--num_workers", "0", "--log_every", "1",
            "--shuffle_buffer", "64", "--hard_negatives", "3", "--cluster_pool", "3", "--max_text_tokens", "16",
            "--adaptor_layers", "1", "--adaptor_heads", "4", "--max_steps", str(steps), "--save_every", "4"]


def _latest(out) -> str:
    path = os.path.join(out, "checkpoints", "latest")
    return open(path).read().strip() if os.path.exists(path) else ""


def _kill_after_checkpoints(module: str, args: list[str], out, spread_s: float, times: int = 2) -> list[str]:
    """Start `python -m MODULE ARGS` `times` times; each time, once it has published a
    checkpoint of its own, SIGKILL it at a moment seeded by the module's name (up to
    `spread_s` later). Returns the last published checkpoint after each kill (a run that
    finished first is not counted)."""
    rng = random.Random(module)
    kills = []
    for _ in range(times):
        before = _latest(out)
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and _latest(out) == before and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, spread_s))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            kills.append(_latest(out))
    return kills


def test_contrastive_trainer_killed_resumes_from_its_last_published_checkpoint(tmp_path, shards):
    from trainer import contrastive

    out = tmp_path / "run"
    kills = _kill_after_checkpoints("trainer.contrastive", _train_args(shards, out, 40), out, spread_s=1.5)
    assert kills, "the trainer finished before it could be killed"
    published = _latest(out)
    assert published.startswith("step-") and not os.path.exists(out / "manifest.json")
    done = contrastive.run(_train_args(shards, out, 40))
    assert done["steps"] == 40 and str(done["resumed_from"]).endswith(published), (done["resumed_from"], published)
    state = json.load(open(out / "checkpoints" / _latest(out) / "train_state.json"))
    assert state["step"] == 40
    assert json.load(open(out / "manifest.json"))["count_check"] == "ok"
    # Every step from the resumed one on is logged once by the finishing run.
    steps = [json.loads(x)["step"] for x in open(out / "train_log.jsonl")]
    resumed_at = int(published.split("-")[1])
    assert steps[-(40 - resumed_at):] == list(range(resumed_at + 1, 41))
    account_counts(f"sigkill_{len(kills)}_resume_from_{published}", "trainer.contrastive", 40, done["steps"], [])


def test_contrastive_predict_killed_then_rerun_equals_a_clean_run(tmp_path, shards):
    from trainer import contrastive, contrastive_predict

    model = tmp_path / "model"
    contrastive.run(_train_args(shards, model, 8))
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for n in range(60):
        qid = ENTITIES[n % len(ENTITIES)][0]
        (images / f"oven_{n:08d}.jpg").write_bytes(draw_image(1000 + n))
        lines.append({"data_id": f"d{n:03d}", "image_id": f"oven_{n:08d}", "question": "what is this?", "entity_id": qid,
                      "data_split": "entity_val_seen"})
    oven = write_jsonl(tmp_path / "oven.jsonl", lines)

    def args(pred, emb):
        return ["--checkpoint", str(model), "--oven", oven, "--images", str(images), "--output", str(pred),
                "--entity_embeddings", str(emb), "--chunk", "4", "--batch_size", "4"]

    clean = contrastive_predict.run(args(tmp_path / "clean.jsonl", tmp_path / "clean_emb"))
    pred, emb = tmp_path / "pred.jsonl", tmp_path / "emb"
    rng = random.Random("trainer.contrastive_predict")
    happened = []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "trainer.contrastive_predict", *args(pred, emb)], cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and not (emb.exists() and os.listdir(emb)) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            happened.append("killed")
    again = contrastive_predict.run(args(pred, emb))
    assert again["predicted"] == clean["predicted"] == 60
    got = [json.loads(x) for x in open(pred)]
    want = [json.loads(x) for x in open(tmp_path / "clean.jsonl")]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms",)} for r in rows]  # noqa: E731
    assert strip(got) == strip(want)
    keys = [r["data_id"] for r in got]
    row = account(f"sigkill_{len(happened)}_of_2_rerun", "trainer.contrastive_predict", {f"d{n:03d}": oven for n in range(60)}, keys, [])
    assert row["lost"] == row["duplicated"] == 0


def test_git_trainer_killed_resumes_from_its_last_published_checkpoint(tmp_path, demo_run):
    """trainer.train (GIT + ALD codes) on the demo's REW shards, killed after a checkpoint of
    its own at seeded moments: the re-run resumes from the last published one."""
    from trainer import train

    demo, _ = demo_run
    out = tmp_path / "git"
    args = ["--train", str(demo / "rew" / "samples-*.parquet"), "--codes", str(demo / "codes"), "--output", str(out),
            "--model_config", "tiny", "--max_steps", "40", "--save_every", "4", "--batch_size", "8", "--log_every", "1",
            "--resume", "auto", "--num_workers", "0"]
    kills = _kill_after_checkpoints("trainer.train", args, out, spread_s=1.0)
    assert kills, "the trainer finished before it could be killed"
    published = _latest(out)
    done = train.run(args)
    assert done["steps"] == 40 and str(done["resumed_from"]).endswith(published), (done["resumed_from"], published)
    assert json.load(open(out / "manifest.json"))["count_check"] == "ok"
    steps = [json.loads(x)["step"] for x in open(out / "train_log.jsonl")]
    resumed_at = int(published.split("-")[1])
    assert steps[-(40 - resumed_at):] == list(range(resumed_at + 1, 41))
    account_counts(f"sigkill_{len(kills)}_resume_from_{published}", "trainer.train", 40, done["steps"], [])
