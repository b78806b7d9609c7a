"""The object store flaking: every pipeline's gs:// run, against the GCS emulator behind a
fault proxy on 127.0.0.1 that answers a share of requests 429/503 and cuts a share of
downloads short, ends equal to a clean local run (same keys, same rows, same counters).
Reads, writes, renames and listings are retried with backoff; a download cut short is
read again, never taken as a short file. A row per pipeline in the fault matrix."""

import glob
import io
import json
import os

import pyarrow.parquet as pq
import pytest

from tests.conftest import start_gcs_emulator
from tests.fake_llm_server import FakeLLMServer
from tests.faults.gcs_fault_proxy import FaultProxy
from tests.faults.matrix import account, account_counts
from tests.helpers import every_pipeline_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flaky_gcs(monkeypatch_module):
    def proxy(url):
        p = FaultProxy(url, error_share=0.08, cut_share=0.25, seed=7).start()
        return p.url, p

    server, faults = start_gcs_emulator(monkeypatch_module, front=proxy)
    yield faults
    faults.stop()
    server.stop()


def _read_parquet(pattern: str) -> list[dict]:
    from apache_beam.io.filesystems import FileSystems

    rows = []
    for m in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
        with FileSystems.open(m.path) as f:
            rows += pq.read_table(io.BytesIO(f.read())).to_pylist()
    return rows


def _read_rejects_gs(output: str) -> list[dict]:
    from apache_beam.io.filesystems import FileSystems

    rows = []
    for m in FileSystems.match([f"{output}/rejected/*/*.jsonl"])[0].metadata_list:
        with FileSystems.open(m.path) as f:
            rows += [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return rows


def _counters(manifest: dict) -> dict:
    # Not compared: retries, time spent, and the prefix-cache hits of a fake endpoint that
    # depend on the order requests arrived in.
    varies = ("io_retries", "llm_cached_input_tokens")
    return {k: v for k, v in manifest["counters"].items()
            if not k.startswith("shuffle_") and k not in varies and not k.endswith("_ms_total") and "_ms_" not in k}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, catalog_path):
    return every_pipeline_inputs(tmp_path_factory.mktemp("flaky_inputs"), catalog_path)


def test_every_pipeline_on_a_flaky_object_store_equals_a_clean_run(tmp_path, flaky_gcs, inputs):
    from pipelines import (
        build_codes,
        build_entity_index,
        decontaminate,
        oven_to_shards,
        refine,
        select_candidates,
    )

    gs = "gs://bucket/flaky"
    local = tmp_path / "clean"
    clip = ["--clip_model", "ViT-S-32", "--clip_pretrained", "none", "--threshold", "0.9999", "--formats", "parquet"]

    def both(run, argv_of):
        clean = run(argv_of(str(local)))
        flaky = run(argv_of(gs))
        assert clean["count_check"] == flaky["count_check"] == "ok"
        assert _counters(flaky) == _counters(clean)
        return clean, flaky

    both(build_entity_index.run, lambda root: ["--entities", inputs["catalog"], "--output", f"{root}/index"])
    assert _read_parquet(f"{gs}/index/entities.parquet") == pq.read_table(local / "index" / "entities.parquet").to_pylist()
    row = account_counts("object_store_429_503_cut", "build_entity_index", 16, len(_read_parquet(f"{gs}/index/entities.parquet")), [])
    assert row["lost"] == 0

    both(select_candidates.run, lambda root: ["--entity_index", f"{root}/index", "--captions", inputs["wds"],
                                              "--caption_format", "webdataset", "--k", "100", "--min_score", "-1",
                                              "--output", f"{root}/cands"])
    got = sorted((r["key"], r["qid"]) for r in _read_parquet(f"{gs}/cands/candidates-*.parquet"))
    want = sorted((r["key"], r["qid"]) for r in pq.read_table(glob.glob(str(local / "cands" / "candidates-*.parquet"))).to_pylist())
    assert got == want and len(got) == 60
    planted = {f"{t:05d}/{i:04d}": f"{t}" for t in range(3) for i in range(20)}
    account("object_store_429_503_cut", "select_candidates", planted, [k for k, _ in got], [])

    both(decontaminate.run, lambda root: ["--input", f"{root}/cands/candidates-*.parquet", "--eval_images", inputs["eval"],
                                          "--output", f"{root}/shards", *clip])
    got = sorted(r["key"] for r in _read_parquet(f"{gs}/shards/samples-*.parquet"))
    want = sorted(r["key"] for r in pq.read_table(glob.glob(str(local / "shards" / "samples-*.parquet"))).to_pylist())
    assert got == want and len(got) == 59  # the copy of one image is the near-duplicate
    account_counts("object_store_429_503_cut", "decontaminate", 60, len(got), [{"reason": "near_duplicate_of_eval"}])

    # refine: its input, output and response cache on gs://; the LLM a loopback endpoint.
    with FakeLLMServer() as llm:
        both(refine.run, lambda root: ["--input", f"{root}/shards/samples-*.parquet", "--entities", inputs["catalog"],
                                       "--entity_index", f"{root}/index", "--output", f"{root}/rew", "--model", "fake-vlm",
                                       "--cache", f"{root}/cache", "--formats", "parquet", "--llm_backend", "openai",
                                       "--endpoint", llm.url])
    verdicts = sorted((r["key"], r["qid"], r["verdict"]) for r in _read_parquet(f"{gs}/rew/samples-*.parquet"))
    want = sorted((r["key"], r["qid"], r["verdict"])
                  for r in pq.read_table(glob.glob(str(local / "rew" / "samples-*.parquet"))).to_pylist())
    assert verdicts == want and verdicts
    rejected = [r for r in _read_rejects_gs(f"{gs}/rew") if r.get("stage") == "refine"]
    account("object_store_429_503_cut", "refine", {k: "shards" for k in got}, [k for k, _, _ in verdicts], rejected)

    both(build_codes.run, lambda root: ["--entity_index", f"{root}/index", "--tokenizer", inputs["vocab"], "--output", f"{root}/codes"])
    assert _read_parquet(f"{gs}/codes/codes.parquet") == pq.read_table(local / "codes" / "codes.parquet").to_pylist()
    account_counts("object_store_429_503_cut", "build_codes", 16, len(_read_parquet(f"{gs}/codes/codes.parquet")), [])

    both(oven_to_shards.run, lambda root: ["--oven", inputs["oven"], "--images", inputs["images"], "--output", f"{root}/oven",
                                           "--formats", "parquet"])
    got = sorted(r["key"] for r in _read_parquet(f"{gs}/oven/samples-*.parquet"))
    assert got == [f"d{i:03d}" for i in range(20)]
    account("object_store_429_503_cut", "oven_to_shards", {k: "oven" for k in got}, got, [])

    # The faults happened: throttled and failed requests, and downloads cut short.
    c = flaky_gcs.counts
    assert c["429"] + c["503"] >= 10 and c["cut"] >= 5, dict(c)
    assert not os.path.exists(os.path.join(str(tmp_path), "gs:"))
