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

from pipelines import refine
from tests.conftest import CATALOG
from tests.fake_llm_server import FakeLLMServer
from tests.faults.matrix import account
from tests.helpers import draw_image, read_rejects
from transforms.schema import Sample, arrow_schema, to_row

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
        while len(glob.glob(str(cache / "*" / "*.json"))) < n and time.time() < deadline and proc.poll() is None:
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
