"""refine --llm_backend vertex_batch against a loopback fake of Vertex AI's batch prediction
API (tests/fake_vertex_server.py) and the GCS emulator: requests staged on gs://, jobs
created, polled and read back by key, a failed line and a lost one asked again, an expired
job's undone half re-submitted, a dead request rejected; every sample answered or rejected
once, nothing paid twice, the same rows as the online backend."""

import pytest

from pipelines import refine
from tests.fake_llm_server import FakeLLMServer
from tests.fake_vertex_server import FakeVertexServer
from tests.test_llm_batch import BATCH_CASES, rejects, rows
from tests.test_refine import base_args, write_samples

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow


def test_vertex_batch_round_trip_with_partial_failures_an_expired_job_and_lost_lines(tmp_path, catalog_path, entity_index, gcs):
    inputs = write_samples(tmp_path / "s.parquet", BATCH_CASES)
    with FakeLLMServer() as online:
        refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "online", tmp_path / "c1")
                   + ["--llm_backend", "openai", "--endpoint", online.url])
    with FakeVertexServer() as vertex:
        vertex.expire_jobs = {1}  # the first job expires with half its lines undone
        args = base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "vertex", tmp_path / "c2") + [
            "--llm_backend", "vertex_batch", "--model", "gemini-2.0-flash-lite", "--vertex_project", "proj",
            "--vertex_endpoint", vertex.url, "--vertex_staging", f"{gcs}/staging", "--wait", "--batch_poll", "0.05",
            "--batch_max_resubmits", "1", "--batch_max_requests", "8", "--llm_prices", "gemini-2.0-flash-lite"]
        summary = refine.run(args)
        answered, seen, jobs = dict(vertex.answered), dict(vertex.lines_seen), len(vertex.jobs)
        # A second run of the same command finds everything in the cache: no new job.
        again = refine.run(args)
        assert len(vertex.jobs) == jobs
    assert summary["count_check"] == "ok" and again["count_check"] == "ok"
    # Nothing was paid twice: every request answered at most once across all jobs.
    assert answered and max(answered.values()) == 1
    # The dead one was in a job, then re-submitted once, then rejected.
    assert max(seen.values()) == 2 and jobs > 2
    assert rows(tmp_path / "vertex") == [r for r in rows(tmp_path / "online") if r[0] != "gone"]
    got = rejects(tmp_path / "vertex")
    assert ("verify", "batch_failed", "gone") in got
    assert [r for r in got if r[2] != "gone"] == [r for r in rejects(tmp_path / "online") if r[2] != "gone"]
    # Tokens as the jobs reported them (Gemini's usageMetadata), priced by the Gemini row of
    # the price book at batch prices.
    assert summary["batch"]["batches"] == jobs and summary["tokens"]["input"] == summary["batch"]["tokens"]["input"] > 0
    t = summary["tokens"]
    assert summary["cost_usd"] == round((t["input"] * 0.075 + t["output"] * 0.3) / 1e6, 9)
    assert summary["options"]["image_tokens"] == "gemini"


def test_vertex_batch_needs_its_project_and_a_cloud_storage_folder(tmp_path, catalog_path, entity_index):
    from transforms.errors import UsageError

    inputs = write_samples(tmp_path / "s.parquet", {k: BATCH_CASES[k] for k in ("ok",)})
    base = base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "o", tmp_path / "c") + ["--llm_backend", "vertex_batch"]
    with pytest.raises(UsageError, match="--vertex_project"):
        refine.run(base)
    with pytest.raises(UsageError, match="--vertex_staging gs://"):
        refine.run(base + ["--vertex_project", "p"])
    with pytest.raises(UsageError, match="Cloud Storage"):
        refine.run(base + ["--vertex_project", "p", "--vertex_staging", str(tmp_path / "local")])
