"""The WikiCLIP-style contrastive trainer: adaptor, InfoNCE with synthesized hard
negatives, visually clustered batches, training on pipeline shards, resume, and the
catalog-embedding + nearest-neighbour prediction scored by trainer.score."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from tests.conftest import CATALOG, direct_pipeline, write_jsonl
from tests.helpers import draw_image
from trainer.contrastive_model import Adaptor, cluster_batches, info_nce, pad_tokens, synthetic_partners
from transforms.schema import Sample

ENTITIES = [(e["wikidata_id"], e["wikipedia_title"]) for e in CATALOG[:8]]


def test_adaptor_shapes_and_masking():
    torch.manual_seed(0)
    ad = Adaptor(text_dim=12, dim=16, layers=2, heads=4, learned_queries=5).eval()
    tokens = torch.randn(3, 7, 12)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    patches = torch.randn(3, 9, 16)
    has = torch.tensor([True, False, True])
    v = ad(tokens, mask, patches, has)
    assert v.shape == (3, 16) and torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Padded text positions do not matter.
    noisy = tokens.clone()
    noisy[1, 4:] = 100.0
    noisy[2, 2:] = -50.0
    assert torch.allclose(ad(noisy, mask, patches, has), v, atol=1e-5)
    # A row without an image is read by the learned queries: its patches do not matter,
    # and it equals the same row run alone without patches.
    other = patches.clone()
    other[1] = torch.randn(9, 16)
    assert torch.allclose(ad(tokens, mask, other, has)[1], v[1], atol=1e-5)
    alone = ad(tokens[1:2], mask[1:2], None, None)
    assert torch.allclose(alone[0], v[1], atol=1e-5)
    # A row with an image depends on it.
    other[0] = torch.randn(9, 16)
    assert not torch.allclose(ad(tokens, mask, other, has)[0], v[0], atol=1e-3)
    # Text matters.
    assert not torch.allclose(ad(tokens.flip(0), mask.flip(0), patches, has)[0], v[0], atol=1e-3)


def test_info_nce_matches_a_hand_computation():
    h = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.3, 1.0]]), dim=-1)
    v = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1, 0.1], [0.0, 1.0, 0.0], [0.4, 0.0, 0.8]]), dim=-1)
    scale = torch.tensor(10.0)
    loss, _ = info_nce(h, v, scale)
    s = (h @ v.T).numpy()
    by_hand = np.mean([-(10 * s[i, i]) + math.log(np.exp(10 * s[i]).sum()) for i in range(3)])
    assert abs(float(loss) - by_hand) < 1e-5
    # Synthetic negatives replace the in-batch negative only where they are more similar.
    syn = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, -1.0]], [[1.0, 0.0, 0.0]]]), dim=-1)
    index = torch.tensor([[1], [2], [0]])
    loss2, replaced = info_nce(h, v, scale, syn, index)
    s2 = s.copy()
    for i, j in enumerate(index[:, 0].tolist()):
        cand = float(h[i] @ syn[i, 0])
        if cand > s2[i, j]:
            s2[i, j] = cand
    by_hand2 = np.mean([-(10 * s2[i, i]) + math.log(np.exp(10 * s2[i]).sum()) for i in range(3)])
    assert abs(float(loss2) - by_hand2) < 1e-5
    expected = np.mean([float(h[i] @ syn[i, 0]) > s[i, j] for i, j in enumerate([1, 2, 0])])
    assert float(replaced) == pytest.approx(expected) and 0 < expected < 1
    assert float(loss2) >= float(loss) - 1e-6  # harder negatives never make it easier


def test_clustered_batches_hold_the_visual_neighbours():
    """Four tight groups of four CLIP-similar queries, shuffled: each batch of 4 is a group.
    Two queries of one entity never share a batch (they would be false negatives)."""
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4]
    h = np.concatenate([c + 0.01 * rng.normal(size=(4, 8)) for c in centres])
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    order = rng.permutation(16)
    h = h[order]
    group = (np.arange(16) // 4)[order]
    qids = [f"Q{i}" for i in range(16)]
    batches = cluster_batches(h, qids, 4, np.random.default_rng(1))
    assert sorted(len(b) for b in batches) == [4, 4, 4, 4]
    assert all(len({group[i] for i in b}) == 1 for b in batches)
    # Same entity twice in a group: split, never in one batch.
    qids2 = list(qids)
    a, b = np.flatnonzero(group == 0)[:2]
    qids2[b] = qids2[a]
    batches2 = cluster_batches(h, qids2, 4, np.random.default_rng(1))
    assert all(len({qids2[i] for i in bt}) == len(bt) for bt in batches2)
    # Synthetic partners are other entities of the batch.
    partners = synthetic_partners(["Q1", "Q2", "Q1", "Q3"], 3, np.random.default_rng(0))
    assert partners.shape == (4, 3)
    assert all(["Q1", "Q2", "Q1", "Q3"][j] != ["Q1", "Q2", "Q1", "Q3"][i] for i in range(4) for j in partners[i])


def test_pad_tokens_keeps_lengths():
    t, m = pad_tokens([np.ones((3, 4), np.float16), np.ones((1, 4), np.float16)], "cpu")
    assert t.shape == (2, 3, 4) and m.tolist() == [[True, True, True], [True, False, False]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import apache_beam as beam

    from transforms.io.writers import WriteShards

    root = tmp_path_factory.mktemp("ctr")
    samples = [
        Sample(key=f"{q}-{i}", image=draw_image(j * 40 + i % 2), image_format="jpg", qid=q, title=t)
        for j, (q, t) in enumerate(ENTITIES) for i in range(6)
    ]
    samples.append(Sample(key="broken", image=b"not an image", image_format="jpg", qid=ENTITIES[0][0], title=ENTITIES[0][1]))
    samples.append(Sample(key="stranger", image=draw_image(999), image_format="jpg", qid="Q424242424", title="Nobody"))
    with direct_pipeline() as p:
        _ = p | beam.Create(samples) | WriteShards(str(root / "shards"), "samples", ["parquet"], num_shards=2)
    catalog = write_jsonl(root / "entities.jsonl", CATALOG)
    return {"root": root, "shards": str(root / "shards" / "samples-*.parquet"), "catalog": catalog}


def _train(shards, out, *extra):
    from trainer import contrastive

    args = ["--train", shards["shards"], "--entities", shards["catalog"], "--output", str(out), "--clip_model", "ViT-S-32",
            "--batch_size", "8", "--lr", "2e-3", "--warmup_steps", "2", "--num_workers", "1", "--log_every", "5",
            "--shuffle_buffer", "64", "--hard_negatives", "3", "--cluster_pool", "3", "--max_text_tokens", "16",
            "--adaptor_layers", "1", "--adaptor_heads", "4"]
    return contrastive.run(args + list(extra))


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctr_run") / "run"
    summary = _train(shards, out, "--max_steps", "80", "--lr", "3e-3")
    return out, summary


def test_loss_falls_on_pipeline_shards_and_bad_rows_are_counted(trained):
    out, summary = trained
    log = [json.loads(x) for x in open(out / "train_log.jsonl")]
    losses = [r["loss"] for r in log]
    assert summary["steps"] == 80 and len(log) == 16
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:2]), losses
    assert any(r["hard_negative_share"] > 0 for r in log)
    # The broken image and the entity missing from the catalog are skipped with reasons.
    assert set(summary["skipped"]) == {"image_undecodable", "qid_not_in_catalog"} or (
        "qid_not_in_catalog" in summary["skipped"] and any(k.startswith("image_") for k in summary["skipped"])), summary["skipped"]
    # Text embeddings were computed once per entity and cached.
    index = [json.loads(x) for x in open(out / "text_cache" / "rank0" / "index.jsonl")]
    assert sorted(q for q, _, _ in index) == sorted(q for q, _ in ENTITIES)
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["kind"] == "model" and manifest["model"] == "wikiclip" and (out / "README.md").exists()


def test_resume_continues(shards, tmp_path):
    out = tmp_path / "r"
    _train(shards, out, "--max_steps", "4", "--save_every", "4")
    cache_rows = len(open(out / "text_cache" / "rank0" / "index.jsonl").readlines())
    summary = _train(shards, out, "--max_steps", "8", "--save_every", "4")
    state = json.load(open(out / "checkpoints" / "step-0000008" / "train_state.json"))
    assert summary["steps"] == 8 and state["step"] == 8 and state["resumed_from"][-1].endswith("step-0000004")
    # One log: step 4 (the first run's last), then 5 and 8 after resuming.
    assert [json.loads(x)["step"] for x in open(out / "train_log.jsonl")] == [4, 5, 8]
    # Nothing recomputed for entities already cached.
    assert len(open(out / "text_cache" / "rank0" / "index.jsonl").readlines()) >= cache_rows
    from transforms.errors import UsageError

    with pytest.raises(UsageError, match="--text_encoder"):
        _train(shards, out, "--max_steps", "9", "--text_encoder", "some/other-model")


def test_catalog_embedding_and_nearest_neighbour_prediction_score(trained, shards, tmp_path):
    from trainer import contrastive_predict, score

    out, _ = trained
    os.makedirs(tmp_path / "images" / "00")
    lines = []
    for j, (qid, _) in enumerate(ENTITIES):
        image_id = f"oven_{j:08d}"
        (tmp_path / "images" / "00" / f"{image_id}.jpg").write_bytes(draw_image(j * 40))
        lines.append({"data_id": f"d{j}", "image_id": image_id, "question": "what is this?", "entity_id": qid,
                      "data_split": "entity_val_seen"})
    lines.append({"data_id": "d-missing", "image_id": "oven_99999999", "entity_id": "Q243", "data_split": "entity_val_seen"})
    oven = write_jsonl(tmp_path / "oven.jsonl", lines)
    emb = tmp_path / "emb"
    pred = tmp_path / "pred.jsonl"
    s = contrastive_predict.run(["--checkpoint", str(out), "--oven", oven, "--images", str(tmp_path / "images"),
                                 "--output", str(pred), "--entity_embeddings", str(emb), "--chunk", "5"])
    assert s["entities"] == 16 and s["predicted"] == 8 and s["errors"] == {"image_missing": 1} and s["ms_per_image"] > 0
    parts = sorted(os.listdir(emb))
    assert [p for p in parts if p.startswith("part-")] == ["part-00000.npy", "part-00001.npy", "part-00002.npy", "part-00003.npy"]
    got = [json.loads(x) for x in open(pred)]
    catalog = {e["wikidata_id"] for e in CATALOG}
    assert all(len(x["beams"]) == 5 and x["pred_entity_id"] in catalog for x in got[:-1])
    refs = [json.loads(x) for x in open(oven)]
    m = score.score(refs, got, allow_partial=True)
    assert m["coverage"] == round(100 * 8 / 9, 2)
    full = score.score(refs[:-1], got[:-1])
    assert full["coverage"] == 100.0
    # The index search is the exact nearest neighbour: brute force over the stored
    # embeddings with the frozen CLIP's query vectors gives the same entity and score.
    from PIL import Image

    from trainer.contrastive_model import FrozenClip
    from trainer.data import center_crop, normalize

    vectors = np.concatenate([np.load(emb / p) for p in parts if p.startswith("part-")])
    qids = sorted(catalog)
    clip = FrozenClip("ViT-S-32", "none", torch.device("cpu"))
    for j, x in enumerate(got[:-1]):
        img = Image.open(tmp_path / "images" / "00" / f"oven_{j:08d}.jpg").convert("RGB")
        px = np.asarray(center_crop(img, clip.image_size), dtype=np.uint8).transpose(2, 0, 1)[None].copy()
        h = clip(normalize(torch.from_numpy(px)))[0].numpy()[0]
        sims = vectors @ h
        assert x["pred_entity_id"] == qids[int(sims.argmax())]
        assert x["beams"][0]["score"] == pytest.approx(float(sims.max()), abs=1e-4)
        assert [b["score"] for b in x["beams"]] == sorted((b["score"] for b in x["beams"]), reverse=True)
    # The embeddings are reused: a second run computes nothing (parts untouched).
    mtimes = {p: os.path.getmtime(emb / p) for p in parts}
    contrastive_predict.run(["--checkpoint", str(out), "--oven", oven, "--images", str(tmp_path / "images"),
                             "--output", str(tmp_path / "p2.jsonl"), "--entity_embeddings", str(emb), "--chunk", "5"])
    assert {p: os.path.getmtime(emb / p) for p in parts} == mtimes
    assert [json.loads(x)["pred_entity_id"] for x in open(tmp_path / "p2.jsonl")] == [x["pred_entity_id"] for x in got]


def test_bf16_autocast_runs_on_cpu(shards, tmp_path):
    summary = _train(shards, tmp_path / "bf16", "--max_steps", "3", "--precision", "bf16", "--save_every", "3")
    assert summary["steps"] == 3 and math.isfinite(summary["last_loss"])


@pytest.mark.slow
def test_torchrun_two_process_gloo(shards, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(28500 + os.getpid() % 1000),
           "-m", "trainer.contrastive", "--train", shards["shards"], "--entities", shards["catalog"], "--output", str(out),
           "--clip_model", "ViT-S-32", "--batch_size", "4", "--max_steps", "3", "--num_workers", "1", "--log_every", "1",
           "--shuffle_buffer", "8", "--cluster_pool", "2", "--hard_negatives", "2", "--max_text_tokens", "16",
           "--adaptor_layers", "1", "--adaptor_heads", "4"]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(out / "train_summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert [json.loads(x)["step"] for x in open(out / "train_log.jsonl")] == [1, 2, 3]
    # Both ranks cached the texts they met; the adaptor they saved is one (DDP kept them equal).
    assert (out / "text_cache" / "rank0" / "index.jsonl").exists() and (out / "text_cache" / "rank1" / "index.jsonl").exists()
