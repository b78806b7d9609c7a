"""refine --llm_backend openai_batch against a loopback server that implements the Files
and Batches contract (upload, create, poll, output and error files, expired batches):
the same rows and rejects as the online backend, re-submission of what did not come
back, a resumable run in rounds, and request files `vllm run-batch` reads."""

import glob
import json
import os

import pyarrow.parquet as pq
import pytest

from pipelines import refine
from tests.fake_llm_server import FakeLLMServer
from tests.helpers import read_rejects
from tests.test_refine import CASES, base_args, write_samples

BATCH_CASES = {k: CASES[k] for k in ("ok", "badjson", "fenced", "to_taj", "to_mercury", "to_nowhere", "notentity")} | {
    "flaky": ("Q243", "[[BATCHFAIL]] the tower from below"),
    "lost": ("Q9202", "[[BATCHLOST]] statue in the fog"),
    "gone": ("Q243", "[[BATCHDEAD]] tower at noon"),
    **{f"p{i}": ("Q243", f"tower photo {i}") for i in range(6)},
}


def rows(out):
    files = glob.glob(os.path.join(out, "samples-*.parquet"))
    return sorted((r["key"], r["qid"], r["verdict"], r["rationale"], r["qa_json"]) for r in pq.read_table(files).to_pylist())


def rejects(out):
    return sorted((r["stage"], r["reason"], r["key"]) for r in read_rejects(out))


@pytest.mark.slow
def test_batch_backend_gives_the_online_result_at_batch_prices(tmp_path, catalog_path, entity_index):
    inputs = write_samples(tmp_path / "s.parquet", BATCH_CASES)
    prices = ["--usd_per_million_input_tokens", "2.5", "--usd_per_million_output_tokens", "10"]
    with FakeLLMServer() as online:
        ref = refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "online", tmp_path / "c1")
                         + ["--llm_backend", "openai", "--endpoint", online.url, *prices])
    with FakeLLMServer() as server:
        server.expire_batches = {1}  # the first batch expires with half its lines undone
        summary = refine.run(
            base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "batch", tmp_path / "c2")
            + ["--llm_backend", "openai_batch", "--endpoint", server.url, "--wait", "--batch_poll", "0.05",
               "--batch_max_resubmits", "1", "--batch_max_requests", "8", *prices]
        )
        chat_calls = len(server.requests)
        seen = dict(server.batch_lines_seen)
        n_batches = len(server.batches)
    assert summary["count_check"] == "ok" and chat_calls == 0  # everything went through batches
    # Same rows and rejects as online, but for the request that never came back.
    assert rows(tmp_path / "batch") == [r for r in rows(tmp_path / "online") if r[0] != "gone"]
    got = rejects(tmp_path / "batch")
    assert ("verify", "batch_failed", "gone") in got
    assert [r for r in got if r[2] != "gone"] == [r for r in rejects(tmp_path / "online") if r[2] != "gone"]
    assert max(seen.values()) == 2  # the dead one: asked, then re-submitted once
    assert n_batches > 2 and summary["batch"]["batches"] == n_batches and summary["batch"]["failed"] >= 3
    # The manifest prices the tokens the batches used, online and at batch prices.
    tokens = summary["tokens"]
    assert tokens["input"] == summary["batch"]["tokens"]["input"] > 0
    assert summary["cost_usd"] == round((tokens["input"] * 2.5 + tokens["output"] * 10) / 1e6, 9)
    assert summary["cost_usd_at_batch_prices"] == round(summary["cost_usd"] * 0.5, 9)
    assert ref["count_check"] == "ok"


@pytest.mark.slow
def test_batch_run_resumes_across_invocations(tmp_path, catalog_path, entity_index):
    cases = {k: BATCH_CASES[k] for k in ("ok", "to_taj", "notentity", "flaky")}
    inputs = write_samples(tmp_path / "s.parquet", cases)
    args = base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "out", tmp_path / "cache") + [
        "--llm_backend", "openai_batch"]
    statuses = []
    with FakeLLMServer() as server:
        server.batch_polls = 1  # in progress at the first poll, done at the second
        for _ in range(16):
            result = refine.run(args + ["--endpoint", server.url])
            statuses.append(result.get("status", "done"))
            if statuses[-1] == "done":
                break
    assert statuses[-1] == "done" and result["count_check"] == "ok", statuses
    assert statuses[0] == "batches_submitted" and "batches_running" in statuses
    assert {r[0] for r in rows(tmp_path / "out")} == {"ok", "to_taj", "flaky"}
    assert os.path.exists(tmp_path / "out" / "manifest.json")


@pytest.mark.slow
def test_request_files_run_offline_like_vllm_run_batch(tmp_path, catalog_path, entity_index):
    """--batch_submit no writes OpenAI batch JSONL; answering each line (as `vllm run-batch`
    does) and handing the output back with --batch_results completes the run."""
    import urllib.request

    cases = {k: BATCH_CASES[k] for k in ("ok", "to_taj", "notentity")}
    inputs = write_samples(tmp_path / "s.parquet", cases)
    out = tmp_path / "out"
    args = base_args(tmp_path, catalog_path, entity_index, inputs, out, tmp_path / "cache") + [
        "--llm_backend", "openai_batch", "--batch_submit", "no"]
    with FakeLLMServer() as server:
        for round_ in range(3):
            result = refine.run(args + ([] if round_ == 0 else ["--batch_results", str(tmp_path / f"results-{round_}.jsonl")]))
            if "status" not in result:
                break
            lines = [json.loads(x) for f in sorted(glob.glob(str(out / "_batch" / "requests" / "*.jsonl")))
                     for x in open(f) if x.strip()]
            for line in lines:  # the contract vllm run-batch reads
                assert set(line) == {"custom_id", "method", "url", "body"} and line["url"] == "/v1/chat/completions"
                assert line["method"] == "POST" and line["body"]["model"] == "fake-vlm"
            with open(tmp_path / f"results-{round_ + 1}.jsonl", "w") as f:
                for line in lines:
                    req = urllib.request.Request(server.url + "/chat/completions", json.dumps(line["body"]).encode(),
                                                 {"Content-Type": "application/json"})
                    body = json.loads(urllib.request.urlopen(req).read())
                    f.write(json.dumps({"id": "x", "custom_id": line["custom_id"], "error": None,
                                        "response": {"status_code": 200, "body": body}}) + "\n")
    assert "status" not in result and result["count_check"] == "ok"
    assert {r[0] for r in rows(out)} == {"ok", "to_taj"}
