"""OVEN scoring against hand-computed values."""

import json
import subprocess
import sys

import pytest

from trainer.score import EPS, ScoreError, harmonic_mean, score


def ref(data_id, qid, split):
    return {"data_id": data_id, "image_id": f"img{data_id}", "question": "what is this?", "entity_id": qid, "data_split": split}


REFERENCE = (
    [ref(f"es{i}", f"Q{i}", "entity_val_seen") for i in range(4)]
    + [ref(f"eu{i}", f"Q1{i}", "entity_val_unseen") for i in range(2)]
    + [ref(f"qs{i}", f"Q2{i}", "query_val_seen") for i in range(2)]
    + [ref("qu0", "Q30", "query_val_unseen")]
)
PREDICTIONS = (
    [{"data_id": "es0", "pred_entity_id": "Q0"}, {"data_id": "es1", "pred_entity_id": "Q1"},
     {"data_id": "es2", "pred_entity_id": "Q2"}, {"data_id": "es3", "pred_entity_id": "Q99"},
     {"data_id": "eu0", "pred_entity_id": "Q10"}, {"data_id": "eu1", "pred_entity_id": "Q0"},
     {"data_id": "qs0", "pred_entity_id": "Q0"}, {"data_id": "qs1", "pred_entity_id": "Q0"},
     {"data_id": "qu0", "pred_entity_id": "Q30"}]
)


def test_hand_computed_values():
    m = score(REFERENCE, PREDICTIONS)
    assert m["splits"] == {"entity_val_seen": 75.0, "entity_val_unseen": 50.0, "query_val_seen": 0.0, "query_val_unseen": 100.0}
    assert (m["entity_seen"], m["entity_unseen"], m["entity"]) == (75.0, 50.0, 60.0)  # 2*75*50/125
    # A zero accuracy is replaced by 1e-12 in the harmonic mean: the score collapses to ~0.
    assert (m["query_seen"], m["query_unseen"]) == (0.0, 100.0)
    assert m["query"] == 0.0 and m["final"] == 0.0
    assert m["coverage"] == 100.0
    assert harmonic_mean(0.0, 100.0) == pytest.approx(2 * EPS, rel=1e-6)


def test_absent_splits_are_left_out_and_seen_unseen_not_confused():
    only_entity = [r for r in REFERENCE if r["data_split"].startswith("entity")]
    m = score(only_entity, PREDICTIONS)
    assert "query" not in m and "final" not in m and "query_seen" not in m
    assert m["entity"] == 60.0
    # "entity_val_unseen" contains "seen" but not "_seen".
    only_unseen = [r for r in REFERENCE if r["data_split"] == "entity_val_unseen"]
    m = score(only_unseen, PREDICTIONS)
    assert "entity_seen" not in m and m["entity_unseen"] == 50.0 and "entity" not in m


def test_missing_predictions_fail_unless_allowed():
    partial = [p for p in PREDICTIONS if p["data_id"] not in ("es0", "qu0")]
    with pytest.raises(ScoreError, match="2 of 9 reference examples have no prediction"):
        score(REFERENCE, partial)
    m = score(REFERENCE, partial, allow_partial=True)
    assert m["coverage"] == round(100 * 7 / 9, 2) and m["entity_seen"] == 50.0 and m["query_unseen"] == 0.0


def test_conflicting_predictions_and_cli(tmp_path):
    with pytest.raises(ScoreError, match="two different predictions"):
        score(REFERENCE, PREDICTIONS + [{"data_id": "es0", "pred_entity_id": "Q5"}])
    ref_path, pred_path, out = tmp_path / "ref.jsonl", tmp_path / "pred.jsonl", tmp_path / "metrics.json"
    ref_path.write_text("".join(json.dumps(r) + "\n" for r in REFERENCE))
    pred_path.write_text("".join(json.dumps(p) + "\n" for p in PREDICTIONS[:-1]))
    proc = subprocess.run([sys.executable, "-m", "trainer.score", "--reference", str(ref_path), "--predictions", str(pred_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--allow_partial" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "trainer.score", "--reference", str(ref_path), "--predictions", str(pred_path),
                           "--allow_partial", "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "entity_seen" in proc.stdout
    metrics = json.loads(out.read_text())
    assert set(metrics) >= {"query_seen", "query_unseen", "query", "entity_seen", "entity_unseen", "entity", "final", "coverage"}
