"""The LLM response cache: batched writes, compaction into generations read by hash, the
old one-file-per-answer layout still read, merges, and damaged segments."""

import glob
import gzip
import hashlib
import json
import os

from transforms.llm import cache as llm_cache
from transforms.llm.cache import ResponseCache, compact, count_entries, list_generations


def key(i: int) -> str:
    return hashlib.sha256(f"request {i}".encode()).hexdigest()


def test_writes_are_batched_and_read_back_by_hash_after_compaction(tmp_path, monkeypatch):
    monkeypatch.setattr(llm_cache, "PART_BYTES", 20_000)  # several partitions for a small cache
    root = str(tmp_path / "cache")
    cache = ResponseCache(root, flush_entries=100, flush_seconds=60)
    for i in range(1000):
        cache.put(key(i), {"text": f"answer {i}", "usage": {"prompt_tokens": i}})
    cache.close()
    segments = glob.glob(os.path.join(root, "segments", "*.jsonl.gz"))
    assert 1 <= len(segments) <= 10  # 1000 answers in at most 10 objects (100 per flush): not one per answer
    assert count_entries(root) == 1000
    manifest = compact(root)
    assert manifest["entries"] == 1000 and manifest["partitions"] > 1 and len(manifest["parts"]) == manifest["partitions"]
    assert not glob.glob(os.path.join(root, "segments", "*"))  # absorbed, then deleted
    reader = ResponseCache(root)
    assert [reader.get(key(i))["text"] for i in range(0, 1000, 37)] == [f"answer {i}" for i in range(0, 1000, 37)]
    assert reader.get(key(5000)) is None and reader.get("f" * 64) is None and reader.get("0" * 64) is None
    assert compact(root) is None  # nothing new


def test_old_layout_is_read_then_absorbed_and_generations_merge(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    old = key(1)
    (root / old[:2]).mkdir(parents=True)
    (root / old[:2] / f"{old}.json").write_text(json.dumps({"text": "from an old version"}))
    assert ResponseCache(str(root)).get(old)["text"] == "from an old version"
    monkeypatch.setattr(llm_cache, "MAX_GENERATIONS", 3)
    for run in range(4):  # four runs, each adding answers: the fourth compaction merges
        c = ResponseCache(str(root))
        c.put(key(100 + run), {"text": f"run {run}"})
        c.close()
        manifest = compact(str(root))
        assert manifest["legacy_absorbed"]
    live = list_generations(str(root))
    assert len(live) == 1 and len(live[0].manifest["supersedes"]) == 3
    reader = ResponseCache(str(root))
    assert reader.get(old)["text"] == "from an old version"
    assert [reader.get(key(100 + r))["text"] for r in range(4)] == [f"run {r}" for r in range(4)]


def test_a_damaged_segment_loses_only_itself(tmp_path):
    root = tmp_path / "cache"
    c = ResponseCache(str(root))
    c.put(key(1), {"text": "kept"})
    c.close()
    (root / "segments" / "0000000000000-cut-000001.jsonl.gz").write_bytes(gzip.compress(b'{"key": "ab", "entry": {"te')[:-9])
    compact(str(root))
    assert ResponseCache(str(root)).get(key(1))["text"] == "kept"


def test_an_unwritable_store_keeps_the_answers_buffered(tmp_path, monkeypatch):
    c = ResponseCache(str(tmp_path / "cache"), flush_seconds=60)
    c.put(key(1), {"text": "a"})
    calls = []

    def broken(path, data):
        calls.append(path)
        raise OSError("store down")

    monkeypatch.setattr(llm_cache, "_write_atomic", broken)
    monkeypatch.setattr("transforms.io.retry.IO_RETRY_DELAY_S", 0.001)
    try:
        c.flush()
    except OSError:
        pass
    assert calls and c._buffer == [(key(1), {"text": "a"})]
    monkeypatch.undo()
    assert c.flush() == 1 and count_entries(str(tmp_path / "cache")) == 1
