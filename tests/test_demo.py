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
    assert kept == len(rows) - 12 == dec["counters"]["samples_written"]
    assert glob.glob(str(shards / "samples-*.tfrecord")) and glob.glob(str(shards / "samples-*.tar"))
