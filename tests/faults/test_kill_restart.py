"""SIGKILL half-way and restart, and a load test: refine against the loopback server
with injected faults. Nothing lost, nothing written twice, no answered request sent
again (a paid request is never paid twice)."""

import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import refine
from tests.conftest import CATALOG
from tests.fake_llm_server import FakeLLMServer
from tests.faults.matrix import account
from tests.helpers import draw_image, read_rejects
from transforms.schema import Sample, arrow_schema, to_row

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TITLES = {e["wikidata_id"]: e["wikipedia_title"] for e in CATALOG}


def _samples(path, n, fault_every=0):
    faults = ["[[429]]", "[[500]]", "[[DROP]]", "[[BADJSON]]"]
    rows = []
    for i in range(n):
        qid = ("Q243", "Q9202", "Q9141")[i % 3]
        marker = faults[(i // fault_every) % len(faults)] + " " if fault_every and i % fault_every == 0 else ""
        rows.append(to_row(Sample(key=f"s{i:05d}", image=draw_image(i % 50, size=(32, 24)), image_format="jpg", width=32, height=24,
                                  caption=f"{marker}photo {i} of {TITLES[qid]}", qid=qid, title=TITLES[qid], source="t")))
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Sample)), path)
    return str(path)


def _args(inputs, catalog_path, entity_index, out, cache, url):
    return ["--input", inputs, "--entities", catalog_path, "--entity_index", entity_index, "--output", str(out),
            "--model", "fake-vlm", "--cache", str(cache), "--formats", "parquet", "--llm_backend", "openai",
            "--endpoint", url, "--max_retries", "3", "--retry_backoff", "0.01"]


def _stored(cache) -> int:
    from transforms.llm.cache import count_entries

    try:
        return count_entries(str(cache)) if cache.exists() else 0
    except Exception:  # noqa: BLE001 - a segment being renamed into place
        return 0


def _out_keys(out):
    return [r["key"] for r in pq.read_table(glob.glob(str(out / "samples-*.parquet"))).to_pylist()]


def test_sigkill_half_way_then_restart(tmp_path, catalog_path, entity_index):
    n = 16
    inputs = _samples(tmp_path / "samples.parquet", n)
    cache, out = tmp_path / "cache", tmp_path / "out"
    with FakeLLMServer(max_answers=n) as first:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.refine",
                                 *_args(inputs, catalog_path, entity_index, out, cache, first.url), "--max_concurrency", "2"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        # Answers reach the cache in batches (a segment every 2 s at most): wait for all n.
        while _stored(cache) < n and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        paid = {h for h, k in first.answered.items() if k}
    assert len(paid) == n and not os.path.exists(out / "manifest.json")
    with FakeLLMServer() as second:
        summary = refine.run(_args(inputs, catalog_path, entity_index, out, cache, second.url))
        resent = paid & set(second.seen)
        twice = [h for h, k in second.answered.items() if k > 1]
    assert summary["count_check"] == "ok" and not resent and not twice
    planted = {f"s{i:05d}": inputs for i in range(n)}
    row = account("sigkill_half_way_restart", "refine", planted, _out_keys(out), read_rejects(out))
    assert row["lost"] == row["duplicated"] == 0 and row["out"] == n


def test_load_5000_requests_with_10_percent_faults(tmp_path, catalog_path, entity_index):
    n = int(os.environ.get("ENTITYFORGE_LOAD_SAMPLES", "2500"))  # two requests each
    inputs = _samples(tmp_path / "samples.parquet", n, fault_every=10)
    out = tmp_path / "out"
    with FakeLLMServer() as server:
        summary = refine.run(_args(inputs, catalog_path, entity_index, out, tmp_path / "cache", server.url)
                             + ["--max_concurrency", "32"])
        answered = dict(server.answered)
        received = len(server.requests)
    twice = [h for h, k in answered.items() if k > 1]
    assert summary["count_check"] == "ok" and not twice
    # Every request answered once (a re-ask after an invalid answer is a new request);
    # the faults cost retries, not answers.
    assert sum(answered.values()) >= 2 * n and received > sum(answered.values())
    planted = {f"s{i:05d}": inputs for i in range(n)}
    row = account(f"load_{2 * n}_requests_10pct_faults", "refine", planted, _out_keys(out), read_rejects(out))
    assert row["lost"] == row["duplicated"] == 0 and row["out"] == n


def test_select_candidates_sigkill_then_rerun_on_the_same_output(tmp_path, entity_index):
    from pipelines import select_candidates
    from tests.helpers import write_webdataset

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    captions = ["Eiffel Tower at night", "Statue of Liberty from the ferry", "Taj Mahal at dawn"]
    for t in range(6):
        write_webdataset(corpus / f"{t:05d}.tar",
                         [{"key": f"{i:04d}", "jpg": draw_image(t * 20 + i), "txt": captions[i % 3]} for i in range(20)])
    args = ["--entity_index", entity_index, "--captions", str(corpus / "*.tar"), "--caption_format", "webdataset",
            "--k", "200", "--min_score", "-1", "--per_caption_entities", "1"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.select_candidates", *args, "--output", str(out), "--num_shards", "4"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Kill once the job is under way (its output folder exists), before it can finish.
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    # (On a fast machine the job may have finished first; the re-run must hold either way.)
    # A killed run's leftovers: a finished shard of another sharding sits there too.
    clean = select_candidates.run([*args, "--output", str(tmp_path / "clean")])
    assert clean["count_check"] == "ok"
    first = sorted(glob.glob(str(tmp_path / "clean" / "candidates-*.parquet")))[0]
    (out / "candidates-00003-of-00005.parquet").write_bytes(open(first, "rb").read())
    again = select_candidates.run([*args, "--output", str(out), "--num_shards", "2"])
    assert again["count_check"] == "ok"
    rows = sorted((r["key"], r["qid"]) for r in pq.read_table(glob.glob(str(out / "candidates-*.parquet"))).to_pylist())
    want = sorted((r["key"], r["qid"]) for r in pq.read_table(glob.glob(str(tmp_path / "clean" / "candidates-*.parquet"))).to_pylist())
    assert rows == want and len(rows) == 120
    planted = {f"{t:05d}/{i:04d}": str(corpus / f"{t:05d}.tar") for t in range(6) for i in range(20)}
    row = account("sigkill_half_way_rerun", "select_candidates", planted, [k for k, _ in rows], read_rejects(out))
    assert row["lost"] == row["duplicated"] == 0 and row["out"] == 120
