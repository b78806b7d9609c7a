"""The training stage: shards written by the pipelines' writers -> trainer.train (tiny GIT on
CPU) -> trainer.predict -> trainer.score; streaming/sharding, corrupt input, resume, a
2-process gloo torchrun, constrained decoding."""

from __future__ import annotations

import glob
import json
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import CATALOG, direct_pipeline, write_jsonl
from tests.helpers import draw_image
from transforms.errors import UsageError
from transforms.schema import Sample, arrow_schema, to_row

ENTITIES = [(e["wikidata_id"], e["wikipedia_title"]) for e in CATALOG[:8]]
PER_ENTITY = 6


def samples():
    out = []
    for j, (qid, title) in enumerate(ENTITIES):
        for i in range(PER_ENTITY):
            out.append(
                Sample(
                    key=f"{qid}-{i}",
                    # Two looks per entity: the model can learn image -> entity here.
                    image=draw_image(j * 40 + i % 2),
                    image_format="jpg",
                    qid=qid,
                    title=title,
                    rationale=f"a tall structure with a lattice, typical of {title}" if i % 2 == 0 else None,
                    qa_json=json.dumps([{"question": "what colour is it?", "answer": "red" if j % 2 else "blue"}]) if i % 3 == 0 else None,
                )
            )
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """WordPiece vocabulary trained here, ALD codes from pipelines.build_codes, and the same
    48 samples written by WriteShards as Parquet, TFRecord and webdataset."""
    import apache_beam as beam
    from tokenizers import BertWordPieceTokenizer

    from pipelines import build_codes
    from transforms.io.writers import WriteShards

    root = tmp_path_factory.mktemp("train_data")
    texts = [e["wikipedia_title"].lower() for e in CATALOG]
    texts += ["what is the main object? what is shown in the photo? why is this image showing this entity?"] * 3
    texts += ["what colour is it? red blue a tall structure with a lattice, typical of"] * 3
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(texts, vocab_size=300, min_frequency=1)
    tok.save_model(str(root))
    catalog = write_jsonl(root / "entities.jsonl", CATALOG)
    build_codes.run(["--entities", catalog, "--tokenizer", str(root / "vocab.txt"), "--output", str(root / "codes")])
    with direct_pipeline() as p:
        _ = p | beam.Create(samples()) | WriteShards(str(root / "shards"), "samples", ["parquet", "tfrecord", "webdataset"], num_shards=2)
    return {"root": root, "codes": str(root / "codes"), "shards": str(root / "shards")}


def train(data, out, *extra):
    from trainer import train as T

    args = [
        "--train", os.path.join(data["shards"], "samples-*"), "--codes", data["codes"], "--output", str(out),
        "--model_config", "tiny", "--batch_size", "8", "--lr", "2e-3", "--decoder_lr_multiplier", "1",
        "--warmup_steps", "2", "--crop", "center", "--num_workers", "1", "--log_every", "1", "--shuffle_buffer", "64",
    ]
    return T.run(args + list(extra))


def log_lines(out):
    with open(os.path.join(out, "train_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_twenty_cpu_steps_on_pipeline_shards_decrease_the_loss(data, tmp_path):
    out = tmp_path / "run"
    summary = train(data, out, "--max_steps", "20")
    losses = [r["loss"] for r in log_lines(out)]
    assert [r["step"] for r in log_lines(out)] == list(range(1, 21))
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses
    assert summary["steps"] == 20 and summary["samples"] == 160 and summary["skipped_total"] == 0
    # All three tasks were drawn (REW rationale and QA ride along with the entity task).
    tasks = set().union(*(r["task_loss"] for r in log_lines(out)))
    assert tasks == {"entity", "rationale", "qa"}
    # Each log line has the time left, falling to 0 at the last step.
    etas = [r["eta_s"] for r in log_lines(out)]
    assert etas[-1] == 0 and etas[0] > 0
    # Like every output, the model folder has a manifest and a card with its loss curve.
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["kind"] == "model" and manifest["steps"] == 20 and manifest["options"]["max_steps"] == 20
    card = open(out / "README.md", encoding="utf-8").read()
    assert "![Training loss per logged step" in card and os.path.getsize(out / "plots" / "loss.png") > 1000
    ckpt = summary["checkpoint"]
    for f in ("model.safetensors", "config.json", "tokenizer.json", "codes.parquet", "train_config.json", "train_state.json", "optimizer.pt"):
        assert os.path.exists(os.path.join(ckpt, f)), f
    assert json.load(open(os.path.join(ckpt, "train_config.json")))["model_config"] == "tiny"


def test_resume_continues_the_step_count(data, tmp_path):
    out = tmp_path / "run"
    train(data, out, "--max_steps", "6", "--save_every", "3")
    first = json.load(open(os.path.join(out, "checkpoints", "step-0000006", "train_state.json")))
    assert first["step"] == 6 and first["samples"] == 48
    summary = train(data, out, "--max_steps", "10", "--save_every", "3")
    assert summary["resumed_from"].endswith("step-0000006")
    assert summary["steps"] == 10 and summary["samples"] == 80
    steps = [r["step"] for r in log_lines(out)]
    assert steps == list(range(1, 11))  # 1..6 from the first run, 7..10 after resuming
    # The LR schedule continues where it was (no second warmup): step 7's LR < step 3's.
    lrs = {r["step"]: r["lr"] for r in log_lines(out)}
    assert lrs[7] < lrs[3]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000006", "step-0000009", "step-0000010"]
    with pytest.raises(UsageError, match="--entity_target"):
        train(data, out, "--max_steps", "12", "--entity_target", "name")
    # `latest` names a checkpoint that is gone: the newest complete one is used instead...
    import shutil

    from trainer.checkpoints import latest_checkpoint

    shutil.rmtree(out / "checkpoints" / "step-0000010")
    assert latest_checkpoint(str(out)).endswith("step-0000009")
    # ... and with none left, resuming is an error, never a silent restart from step 0.
    for d in ("step-0000006", "step-0000009"):
        shutil.rmtree(out / "checkpoints" / d)
    with pytest.raises(UsageError, match=r"names checkpoint 'step-0000010', which is missing.*--resume never"):
        train(data, out, "--max_steps", "12")


def test_checkpoint_helper_publishes_finds_and_resumes(tmp_path):
    """trainer.checkpoints, shared by trainer.train and trainer.contrastive, without torch:
    publish (state last, rename, `latest`, keep the newest N), find, resolve, resume."""
    from trainer import checkpoints as C

    out = str(tmp_path / "run")
    config = {"model_config": "tiny", "entity_target": "code", "max_steps": 9}
    assert C.latest_checkpoint(out) is None
    assert C.resume(out, "auto", config, ("model_config",)) == (None, C.new_state())
    for step in (3, 6, 9):
        tmp = C.staging_folder(out, step)
        open(os.path.join(tmp, "weights.bin"), "wb").close()
        path = C.publish_checkpoint(out, step, config, {**C.new_state(), "step": step}, keep=2)
        assert path == os.path.join(out, "checkpoints", f"step-{step:07d}")
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-0000006", "step-0000009"]
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "step-0000009"
    newest = C.latest_checkpoint(out)
    assert newest.endswith("step-0000009") and C.read_config(newest) == config
    assert os.path.exists(os.path.join(newest, "weights.bin"))
    # A folder without its state file (a kill mid-save) is not complete: never chosen.
    os.makedirs(os.path.join(out, "checkpoints", "step-0000012"))
    assert C.latest_checkpoint(out) == newest
    assert C.resolve_checkpoint(out) == newest and C.resolve_checkpoint(newest) == newest
    with pytest.raises(UsageError, match="neither a checkpoint folder"):
        C.resolve_checkpoint(str(tmp_path))
    # resume: auto -> the newest; a path -> that one; never -> step 0.
    frm, state = C.resume(out, "auto", config, ("model_config", "entity_target"))
    assert frm == newest and state["step"] == 9 and state["resumed_from"] == [newest]
    older = os.path.join(out, "checkpoints", "step-0000006")
    frm, state = C.resume(out, older, config, ())
    assert frm == older and state["step"] == 6
    assert C.resume(out, "never", config, ("model_config",)) == (None, C.new_state())
    with pytest.raises(UsageError, match=r"--entity_target 'name' differs from the checkpoint's 'code'.*--resume never"):
        C.resume(out, "auto", {**config, "entity_target": "name"}, ("model_config", "entity_target"))
    # trainer.train re-exports the same names (older code imports them from there).
    from trainer import train

    assert train.latest_checkpoint is C.latest_checkpoint and train.CONFIG_FILE == "train_config.json"


def _flip_byte(path, offset_from_end):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_samples_are_skipped_and_counted(data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in glob.glob(os.path.join(data["shards"], "samples-*")):
        shutil.copy(p, bad)
    rows = [to_row(s) for s in samples()[:4]]
    rows[0]["image"] = b"not an image at all"
    rows[1]["image"] = rows[1]["image"][: len(rows[1]["image"]) // 3]
    rows[2]["qid"] = "Q424242"  # no code
    rows[3]["qid"] = ""
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Sample)), bad / "extra.parquet")
    (bad / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    tfr = sorted(glob.glob(str(bad / "*.tfrecord")))
    _flip_byte(max(tfr, key=os.path.getsize), 100)  # inside the last record's payload
    tar = max(glob.glob(str(bad / "*.tar")), key=os.path.getsize)
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2 + 100)
    from trainer import train as T

    summary = T.run([
        "--train", str(bad), "--codes", data["codes"], "--output", str(tmp_path / "run"), "--model_config", "tiny",
        "--batch_size", "8", "--max_steps", "30", "--crop", "center", "--num_workers", "1", "--shuffle_buffer", "8",
        "--task_weights", "entity=1",
    ])
    skipped = summary["skipped"]
    for reason in ("image_not_an_image", "qid_not_in_codes", "missing_qid", "unreadable_file", "tfrecord_bad_crc"):
        assert skipped.get(reason, 0) >= 1, (reason, skipped)
    assert any(r in skipped for r in ("image_truncated_image", "image_corrupt_image")), skipped
    assert summary["steps"] == 30


def test_stream_shards_disjointly_across_ranks_and_workers(data):
    from trainer.codebook import CodeBook, load_tokenizer
    from trainer.data import ItemBuilder, ShardStream, list_units

    builder = ItemBuilder(load_tokenizer(data["codes"]).to_str(), CodeBook.load(data["codes"]), 32, {"entity": 1.0}, crop="center")
    for pattern in ("samples-*.parquet", "samples-*.tar", "samples-*.tfrecord"):
        units = list_units(os.path.join(data["shards"], pattern))
        for world in (1, 2, 3):  # 3 > units: record striding instead of unit assignment
            seen = []
            for rank in range(world):
                stream = ShardStream(units, builder, rank=rank, world=world, max_epochs=1, shuffle_buffer=4)
                seen.append([it["key"] for it in stream])
            counts = [len(s) for s in seen]
            every = [k for s in seen for k in s]
            # One epoch over all readers: every sample exactly once.
            assert sorted(every) == sorted(s.key for s in samples()), (pattern, world, counts)
            if world > 1 and len(units) < world:
                assert max(counts) - min(counts) <= 1, counts


def test_stream_rows_equal_what_was_written(data):
    """Each format reads back the written samples (keys, qids, REW fields)."""
    from trainer.data import iter_unit, list_units

    want = {s.key: s for s in samples()}
    for pattern in ("samples-*.parquet", "samples-*.tar", "samples-*.tfrecord"):
        got = {}
        for unit in list_units(os.path.join(data["shards"], pattern)):
            for row in iter_unit(unit):
                assert isinstance(row, dict), row
                got[row["key"]] = row
        assert set(got) == set(want), pattern
        for k, s in want.items():
            assert (got[k]["qid"], got[k]["image"], got[k]["rationale"], got[k]["qa_json"]) == (s.qid, s.image, s.rationale, s.qa_json)


def test_tfrecord_reader_reports_bad_crc_and_truncation(tmp_path):
    from trainer.data import Skip, _masked_crc, iter_tfrecord

    def frame(payload):
        head = struct.pack("<Q", len(payload))
        return head + struct.pack("<I", _masked_crc(head)) + payload + struct.pack("<I", _masked_crc(payload))

    import io

    good = frame(b"one") + frame(b"two") + frame(b"three")
    assert list(iter_tfrecord(io.BytesIO(good))) == [b"one", b"two", b"three"]
    broken = bytearray(good)
    broken[len(frame(b"one")) + 12] ^= 0xFF  # payload of "two"
    out = list(iter_tfrecord(io.BytesIO(bytes(broken))))
    assert out[0] == b"one" and isinstance(out[1], Skip) and out[1].reason == "tfrecord_bad_crc" and out[2] == b"three"
    out = list(iter_tfrecord(io.BytesIO(good[:-3])))
    assert out[:2] == [b"one", b"two"] and out[2].reason == "tfrecord_truncated"
    broken = bytearray(good)
    broken[2] ^= 0xFF  # the first length
    out = list(iter_tfrecord(io.BytesIO(bytes(broken))))
    assert len(out) == 1 and out[0].reason == "tfrecord_bad_length_crc"


@pytest.mark.slow
def test_torchrun_two_process_gloo(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
        "-m", "trainer.train", "--train", os.path.join(data["shards"], "samples-*.parquet"), "--codes", data["codes"],
        "--output", str(out), "--model_config", "tiny", "--batch_size", "4", "--max_steps", "4", "--crop", "center",
        "--num_workers", "1", "--log_every", "1", "--shuffle_buffer", "8",
    ]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(out / "train_summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["samples"] == 4 * 4 * 2
    # Only rank 0 writes: one log line per step.
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4]


def test_usage_errors_name_the_flag(data, tmp_path):
    from trainer import train as T

    base = ["--train", os.path.join(data["shards"], "samples-*"), "--output", str(tmp_path / "o"), "--model_config", "tiny"]
    with pytest.raises(UsageError, match="--codes"):
        T.run(base + ["--codes", str(tmp_path / "nope")])
    with pytest.raises(UsageError, match="--task_weights"):
        T.run(base + ["--codes", data["codes"], "--task_weights", "entity=1,captions=2"])
    with pytest.raises(UsageError, match="--precision fp16"):
        T.run(base + ["--codes", data["codes"], "--precision", "fp16", "--device", "cpu"])
    with pytest.raises(UsageError, match="--train"):
        T.run(["--train", str(tmp_path / "none-*.parquet"), "--codes", data["codes"], "--output", str(tmp_path / "o"), "--model_config", "tiny"])


def test_prefix_index_matches_brute_force():
    from trainer.codebook import PrefixIndex

    rng = random.Random(0)
    eos = 2
    rows = set()
    while len(rows) < 120:  # of 155 possible
        n = rng.randint(1, 3)
        rows.add(tuple(rng.choice([5, 6, 7, 8, 9]) for _ in range(n)) + (eos,) * (4 - n))
    rows = sorted(rows, key=lambda r: rng.random())
    index = PrefixIndex(np.array(rows), eos)
    for _ in range(300):
        r = rows[rng.randrange(len(rows))]
        k = rng.randint(0, 3)
        prefix = r[:k]
        want = sorted({x[k] for x in rows if x[:k] == prefix})
        assert list(index.allowed(prefix)) == want
        assert index.lookup(list(r)) == [rows.index(r)]
    assert index.allowed((9, 9, 9, 9)) in ((), (eos,))
    assert index.lookup([1, 1]) == []


def test_codebook_lookup_and_eos_canonicalisation():
    from trainer.codebook import CodeBook

    cb = CodeBook(["Q10", "Q2", "Q300"], np.array([[5, 2, 7, 2], [6, 7, 2, 2], [5, 6, 7, 2]]), eos=2, titles=["a", "b", "c"])
    assert cb.code_of("Q2") == [6, 7, 2] and cb.code_of("Q10") == [5, 2] and cb.code_of("Q300") == [5, 6, 7, 2]
    assert cb.codes[0].tolist() == [5, 2, 2, 2]  # padding after the first EOS is EOS
    assert cb.row_of("Q3") == -1 and cb.row_of("q10") == -1 and cb.row_of("") == -1
    odd = CodeBook(["Q1", "L5-x", "Q0"], np.array([[5, 2], [6, 2], [7, 2]]), eos=2)
    assert odd.code_of("L5-x") == [6, 2] and odd.code_of("Q0") == [7, 2]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny model trained long enough to memorise the 8 entities' two looks."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(data, out, "--max_steps", "400", "--batch_size", "16", "--task_weights", "entity=1", "--log_every", "50", "--lr", "3e-3")
    return out


def oven_eval(root):
    """OVEN-format annotations over training looks (seen) and a missing image."""
    os.makedirs(root / "images" / "00", exist_ok=True)
    lines = []
    for j, (qid, _) in enumerate(ENTITIES):
        image_id = f"oven_{j:08d}"
        (root / "images" / "00" / f"{image_id}.jpg").write_bytes(draw_image(j * 40))
        lines.append({"data_id": f"d{j}", "image_id": image_id, "question": "what is this?", "entity_id": qid,
                      "data_split": "entity_val_seen" if j % 2 else "entity_val_unseen"})
    lines.append({"data_id": "d-missing", "image_id": "oven_99999999", "entity_id": "Q243", "data_split": "entity_val_seen"})
    return write_jsonl(root / "oven.jsonl", lines), str(root / "images")


def test_predict_constrained_beams_are_entities_and_score(trained, tmp_path):
    from trainer import predict, score

    oven, images = oven_eval(tmp_path)
    out = tmp_path / "pred.jsonl"
    summary = predict.run(["--checkpoint", str(trained), "--oven", oven, "--images", images, "--output", str(out)])
    lines = [json.loads(x) for x in open(out)]
    assert [x["data_id"] for x in lines] == [f"d{j}" for j in range(len(ENTITIES))] + ["d-missing"]
    assert summary["predicted"] == len(ENTITIES) and summary["errors"] == {"image_missing": 1}
    valid = {q for q, _ in CATALOG_QIDS}
    for x in lines[:-1]:
        assert len(x["beams"]) == 4 and all(b["qid"] in valid for b in x["beams"]), x
        assert x["pred_entity_id"] == x["top_beam_entity_id"] == x["beams"][0]["qid"]
    assert lines[-1]["pred_entity_id"] is None and lines[-1]["error"] == "image_missing"
    # Memorised: most training looks come back as their entity.
    correct = sum(x["pred_entity_id"] == q for x, (q, _) in zip(lines, ENTITIES))
    assert correct >= 5, [x["pred_entity_id"] for x in lines]
    refs = [json.loads(x) for x in open(oven)]
    m = score.score(refs, lines, allow_partial=True)
    assert m["coverage"] == round(100 * 8 / 9, 2)
    with pytest.raises(score.ScoreError, match="no prediction"):
        score.score(refs, lines)
    with open(oven, "a", encoding="utf-8") as f:
        f.write("{this is not json\n")
    free = tmp_path / "free.jsonl"
    summary = predict.run(["--checkpoint", str(trained), "--oven", oven, "--images", images, "--output", str(free), "--decoding", "free"])
    assert len(open(free).readlines()) == len(ENTITIES) + 1 and summary["bad_annotation_lines"] == 1
    rejected = [json.loads(x) for x in open(str(free) + ".rejected.jsonl")]
    assert [r["reason"] for r in rejected] == ["bad_annotation"] and rejected[0]["text"].startswith("{this")
    # The error line carries every prediction field, so any --prediction_field scores it.
    free_lines = [json.loads(x) for x in open(free)]
    valid_top = sum(1 for x in free_lines if x["top_beam_entity_id"])
    assert score.score(refs, free_lines, allow_partial=True, field="top_beam_entity_id")["coverage"] == round(100 * valid_top / 9, 2)


CATALOG_QIDS = [(e["wikidata_id"], e["wikipedia_title"]) for e in CATALOG]


def test_vote_majority_then_similarity_then_rank():
    from trainer.visual_matching import vote

    labels = ["A", "B", "B", "A", "C"]
    # A: 2 votes (0.9 + 0.5), B: 2 votes (0.8 + 0.7) -> tie on votes, B wins on summed similarity.
    ranked = vote(np.array([0, 1, 2, 3, 4]), np.array([0.9, 0.8, 0.7, 0.5, 0.4]), labels)
    assert [r[0] for r in ranked] == ["B", "A", "C"] and ranked[0][1] == 2
    # Equal votes and sums: the label with the nearer neighbour wins; -1 (no neighbour) ignored.
    ranked = vote(np.array([4, 0, -1]), np.array([0.5, 0.5, 0.0]), labels)
    assert [r[0] for r in ranked] == ["C", "A"]


def test_visual_matching_nearest_copy_and_candidate_labels(data, tmp_path):
    """Queries are copies of memory images: with k = 1 the vote is the copy's own label;
    --label_field candidate_qid votes with the retrieval labels instead."""
    from trainer import score, visual_matching

    mem = tmp_path / "memory"
    mem.mkdir()
    rows = [to_row(s) for s in samples()]
    for r in rows:
        r["candidate_qid"] = "Q146"  # what caption retrieval had proposed for all of them
    rows.append({**rows[0], "key": "broken", "image": b"\x89PNG broken"})
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Sample)), mem / "samples-0.parquet")
    oven, images = oven_eval(tmp_path)
    out = tmp_path / "vm.jsonl"
    args = ["--memory", str(mem), "--oven", oven, "--images", images, "--clip_model", "ViT-S-32", "--clip_pretrained", "none",
            "--num_workers", "1", "--memory_cache", str(tmp_path / "cache")]
    summary = visual_matching.run(args + ["--output", str(out), "--k", "1"])
    assert summary["memory_images"] == len(ENTITIES) * PER_ENTITY and summary["memory_skipped"] == {"image_not_an_image": 1}
    assert summary["errors"] == {"image_missing": 1}
    lines = [json.loads(x) for x in open(out)]
    assert [x["pred_entity_id"] for x in lines[:-1]] == [q for q, _ in ENTITIES]
    refs = [json.loads(x) for x in open(oven)]
    assert score.score(refs, lines, allow_partial=True)["entity_seen"] == 80.0  # 4 of 5: the missing image counts as wrong
    cand = tmp_path / "cand.jsonl"
    summary = visual_matching.run(args + ["--output", str(cand), "--k", "500", "--label_field", "candidate_qid"])
    assert summary["k"] == len(ENTITIES) * PER_ENTITY  # k is capped by the memory
    assert {json.loads(x)["pred_entity_id"] for x in list(open(cand))[:-1]} == {"Q146"}


def test_name_target_trains_and_decodes_catalog_titles(data, tmp_path):
    """--entity_target name: the target is the title; constrained decoding yields catalog
    titles, mapped back to QIDs (case-only twins share no sequence: titles are lower-cased,
    so "Ball" / "BALL" decode to one sequence and both QIDs are reported)."""
    from trainer import predict

    out = tmp_path / "run"
    train(data, out, "--max_steps", "60", "--batch_size", "16", "--task_weights", "entity=1", "--entity_target", "name", "--lr", "3e-3")
    oven, images = oven_eval(tmp_path)
    pred = tmp_path / "pred.jsonl"
    predict.run(["--checkpoint", str(out), "--oven", oven, "--images", images, "--output", str(pred)])
    titles = {t.lower() for _, t in CATALOG_QIDS}
    lines = [json.loads(x) for x in open(pred)][:-1]
    for x in lines:
        for b in x["beams"]:
            assert b["qid"] is not None and b["text"] in titles, b
    from trainer.predict import Decoder

    dec = Decoder(str(out / "checkpoints" / "step-0000060"), __import__("torch").device("cpu"))
    qid, others = dec.resolve(dec.encode("ball") + [dec.eos])
    assert {qid, *others} == {"Q999000001", "Q999000002"}


def test_questions_by_stage():
    from trainer.codebook import CodeBook
    from trainer.data import GENERIC_QUESTIONS, ItemBuilder

    cb = CodeBook(["Q1"], np.array([[5, 2]]), eos=2)
    pre = ItemBuilder("{}", cb, 32, {"entity": 1.0}, stage="pretrain")
    fine = ItemBuilder("{}", cb, 32, {"entity": 1.0}, stage="finetune", question="what is this?")
    rng = random.Random(0)
    assert {pre.question_for({}, rng) for _ in range(200)} == set(GENERIC_QUESTIONS)
    assert fine.question_for({}, rng) == "what is this?"
    assert fine.question_for({"question": "which bridge is this?"}, rng) == "which bridge is this?"
    assert fine.question_for({"meta_json": json.dumps({"question": "what breed?"})}, rng) == "what breed?"


def test_init_from_a_local_pretrained_folder(data, tmp_path):
    """--init takes a saved GIT (a hub id on users' machines); a model whose vocabulary is
    smaller than the codes' tokenizer is refused with the fix."""
    from trainer.codebook import load_tokenizer
    from trainer.model import build_model

    tok = load_tokenizer(data["codes"])
    ok = build_model("tiny", None, tok.get_vocab_size() + 10, 0, 1, 2, seed=1)
    ok.save_pretrained(tmp_path / "pretrained")
    summary = train(data, tmp_path / "run", "--max_steps", "2", "--init", str(tmp_path / "pretrained"))
    assert summary["steps"] == 2
    small = build_model("tiny", None, 50, 0, 1, 2)
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(UsageError, match="bert-base-uncased"):
        train(data, tmp_path / "run2", "--max_steps", "2", "--init", str(tmp_path / "small"))
    with pytest.raises(UsageError, match="--init"):
        train(data, tmp_path / "run3", "--max_steps", "2", "--init", str(tmp_path / "missing"))


def test_bf16_autocast_and_grad_accumulation_run(data, tmp_path):
    """The autocast path (bf16 works on CPU too; on GPU it is the default) and --grad_accum:
    each optimizer step consumes grad_accum micro-batches."""
    summary = train(data, tmp_path / "run", "--max_steps", "3", "--precision", "bf16", "--grad_accum", "2")
    assert summary["steps"] == 3 and summary["samples"] == 3 * 8 * 2
    assert all(np.isfinite(r["loss"]) for r in log_lines(tmp_path / "run"))


def test_more_readers_than_records_and_all_bad_data(data, tmp_path):
    """Readers without records end quietly while the others feed training; a job whose
    readers all end fails with an error that says why."""
    rows = [to_row(s) for s in samples()[:3]]
    few = tmp_path / "few"
    few.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Sample)), few / "samples.parquet")
    from trainer import train as T

    base = ["--codes", data["codes"], "--model_config", "tiny", "--batch_size", "2", "--crop", "center", "--task_weights", "entity=1",
            "--shuffle_buffer", "2", "--max_steps", "3"]
    summary = T.run(base + ["--train", str(few), "--output", str(tmp_path / "a"), "--num_workers", "4"])
    assert summary["steps"] == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    for r in rows:
        r["image"] = b"junk"
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Sample)), bad / "samples.parquet")
    with pytest.raises(RuntimeError, match="every data reader ended"):
        T.run(base + ["--train", str(bad), "--output", str(tmp_path / "b"), "--num_workers", "1"])


def test_rq_codes_train_and_decode_unchanged(data, entity_index, tmp_path):
    """IRGen residual-quantization codes go through trainer.train and trainer.predict as
    they are: constrained beams are valid RQ codes, i.e. catalog entities."""
    from pipelines import build_codes
    from trainer import predict
    from trainer.codebook import CodeBook

    codes = tmp_path / "rq_codes"
    m = build_codes.run(["--entity_index", entity_index, "--tokenizer", str(data["root"] / "vocab.txt"), "--strategy", "rq",
                         "--output", str(codes)])
    assert m["unique"] and m["strategy"] == "rq"
    out = tmp_path / "run"
    args = ["--train", os.path.join(data["shards"], "samples-*.parquet"), "--codes", str(codes), "--output", str(out),
            "--model_config", "tiny", "--batch_size", "16", "--lr", "3e-3", "--decoder_lr_multiplier", "1", "--warmup_steps", "2",
            "--crop", "center", "--num_workers", "1", "--log_every", "10", "--shuffle_buffer", "64", "--max_steps", "60",
            "--task_weights", "entity=1"]
    from trainer import train as T

    summary = T.run(args)
    assert summary["skipped_total"] == 0 and summary["last_loss"] < summary["first_loss"]
    oven, images = oven_eval(tmp_path)
    pred = tmp_path / "pred.jsonl"
    predict.run(["--checkpoint", str(out), "--oven", oven, "--images", images, "--output", str(pred)])
    book = CodeBook.load(str(codes))
    lines = [json.loads(x) for x in open(pred)][:-1]
    # A beam maps to a QID only when its token sequence is exactly one entity's RQ code.
    assert lines and all(len(x["beams"]) == 4 and all(b["qid"] in set(book.qids) for b in x["beams"]) for x in lines)
