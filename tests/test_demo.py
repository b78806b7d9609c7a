"""The README's first command runs the demo; this runs the same entry point."""

import glob
import json

import pyarrow.parquet as pq

from pipelines import demo


def test_demo_end_to_end(tmp_path, capsys):
    summary = demo.main(["--output", str(tmp_path), "--k", "5"])
    assert summary["count_check"] == "ok"
    printed = capsys.readouterr().out
    assert "candidates-*.parquet" in printed and "rejected" in printed
    rows = pq.read_table(glob.glob(str(tmp_path / "candidates" / "candidates-*.parquet"))).to_pylist()
    assert rows and all(r["image"] for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)
    titles = {r["title"] for r in rows}
    assert {"Eiffel Tower", "Statue of Liberty", "Taj Mahal"} <= titles
    counts = {}
    for qid in (r["qid"] for r in rows):
        counts[qid] = counts.get(qid, 0) + 1
    assert max(counts.values()) <= 5
    index_manifest = json.load(open(tmp_path / "entity_index" / "manifest.json"))
    assert index_manifest["num_entities"] == 322
    assert index_manifest["counters"]["rejected_dedup_duplicate_qid"] == 2
    # The three broken demo captions are rejected with their reasons.
    reasons = set()
    for path in glob.glob(str(tmp_path / "candidates" / "rejected" / "read_captions" / "*.jsonl")):
        reasons |= {json.loads(line)["reason"] for line in open(path)}
    assert reasons == {"empty_caption", "bad_utf8", "caption_too_long"}
    # Decontamination: every exact, re-encoded and resized evaluation copy is caught, and
    # nothing else is dropped; the shards hold exactly the rest, in all three formats.
    dec = summary["decontaminate"]
    assert dec["count_check"] == "ok"
    assert "exact      4/4 caught" in printed and "reencoded  4/4 caught" in printed and "resized    4/4 caught" in printed
    assert "other images dropped: 0" in printed
    assert dec["counters"]["decontaminate_dropped"] == 12
    shards = tmp_path / "shards"
    kept = pq.read_table(glob.glob(str(shards / "samples-*.parquet"))).num_rows
    assert kept == len(rows) - 12 == dec["counters"]["written_samples_parquet"]
    assert glob.glob(str(shards / "samples-*.tfrecord")) and glob.glob(str(shards / "samples-*.tar"))
    # REW with the replay backend: every request is answered from the demo cache (no
    # not_in_cache), corrections are grounded, and the counts add up.
    rew = summary["refine"]
    assert rew["count_check"] == "ok" and rew["requests_sent"] == 0
    assert "not_in_cache" not in json.dumps(rew["rejects"])
    refined = pq.read_table(glob.glob(str(tmp_path / "rew" / "samples-*.parquet"))).to_pylist()
    assert len(refined) == rew["counters"]["samples_refined"] == 25
    corrected = [r for r in refined if r["changed"]]
    assert len(corrected) == 10 and all(r["qid"] != r["candidate_qid"] and r["verdict"] == "corrected" for r in corrected)
    assert all(r["rationale"] and len(json.loads(r["qa_json"])) == 3 for r in refined)
    # Training stage: codes, a tiny GIT trained on the REW shards, predictions, OVEN score.
    trained = summary["train"]
    assert trained["codes"]["unique"] and trained["codes"]["entities"] == 322
    assert trained["train"]["last_loss"] < 0.7 * trained["train"]["first_loss"]
    m = trained["metrics"]
    assert m["coverage"] == 100.0 and trained["predict"]["annotations"] == 2 * (25 + 10)
    # Seen = the training images (memorised well above the 1/322 chance); unseen = 0.
    assert m["entity_seen"] >= 40 and m["entity_unseen"] == 0.0
    assert "entity_val_seen" in printed and "final" in printed
