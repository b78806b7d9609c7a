"""LLM calls for the REW stage: requests, the response cache, answer parsing, and the
backends (each a Beam `ModelHandler` over a batch of `LLMRequest`).

* `openai`: any OpenAI-compatible chat-completions endpoint (vllm serve, SGLang,
  llama.cpp server, hosted APIs). Asynchronous (aiohttp: our own retry rules below, which
  the `openai` client's built-in retries would double), sending within the process's share
  of the job-wide budget (`llm_budget`), a timeout per request, retries with exponential
  backoff and full jitter on 5xx, timeouts and dropped connections; 429/503 wait for their
  Retry-After and lower the send rate. Structured output in the dialect the server speaks:
  `json_schema` first, then `json_object` + schema, then plain JSON instructions; the first
  that the server accepts is remembered. The API key is read on the worker (Secret Manager
  or an environment variable) and never logged or written.
* `openai_batch` (`llm_batch`): the same requests through a provider's batch API.
* `replay`: answers only from the cache; a miss is `not_in_cache`.
Every answer is validated against the task's JSON schema (exactly one JSON document: the
whole answer or one fenced block; see `parse_answer`); an invalid answer is re-asked up to `max_reasks` times, then returned
as `llm_invalid_output` with the raw text. Answers are cached (`llm_cache`) by a hash of
the model id, prompt id and hash, the rendered messages (the image by its sha256) and the
sampling parameters, so a restarted run never pays twice.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from transforms.formats import safe_json
from transforms.llm.budget import Budget, BudgetSpec, registry_for
from transforms.llm.cache import ResponseCache
from transforms.llm.cost import request_tokens
from transforms.run.progress import counter
from transforms.run.secrets import register_secret

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
DIALECTS = ("json_schema", "json_object", "none")


# Beam's metrics belong to the thread that runs the DoFn; the HTTP requests run on the
# endpoint's event-loop thread, where an increment would be lost. Counts made there are
# kept here and handed to Beam by the DoFn thread after each batch (`flush_counts`).
_PENDING: dict[str, int] = {}
_PENDING_LOCK = threading.Lock()


class _DeferredCounter:
    def __init__(self, name: str):
        self.name = name

    def inc(self, n: int = 1) -> None:
        with _PENDING_LOCK:
            _PENDING[self.name] = _PENDING.get(self.name, 0) + n


def flush_counts() -> None:
    """Report the counts made on any thread to Beam, from the DoFn's thread."""
    with _PENDING_LOCK:
        pending = dict(_PENDING)
        _PENDING.clear()
    for name, n in pending.items():
        counter(name).inc(n)


@dataclass
class LLMRequest:
    """One chat call: what decides the answer, and nothing else, goes into the cache key."""

    model: str
    prompt_id: str
    prompt_sha256: str
    text: str
    image: Optional[bytes]
    image_mime: str
    schema: dict
    sampling: dict = field(default_factory=dict)
    tag: Any = None  # the caller's record; not part of the key
    # Text after the image (prompts laid out for prefix caching: the caption goes last).
    text_after: str = ""
    # Requests of one group (refine: one entity) go out next to each other, so a provider's
    # prefix cache sees their shared prefix back to back; not part of the key.
    group: Any = None

    @property
    def image_sha256(self) -> Optional[str]:
        return hashlib.sha256(self.image).hexdigest() if self.image is not None else None

    def messages(self, with_image_data: bool = True, history: Sequence[dict] = ()) -> list[dict]:
        content: list[dict] = [{"type": "text", "text": self.text}]
        if self.image is not None:
            url = (
                f"data:{self.image_mime};base64,{base64.b64encode(self.image).decode('ascii')}"
                if with_image_data
                else f"sha256:{self.image_sha256}"
            )
            content.append({"type": "image_url", "image_url": {"url": url}})
        if self.text_after:
            content.append({"type": "text", "text": self.text_after})
        return [{"role": "user", "content": content}, *history]

    def cache_key(self, history: Sequence[dict] = ()) -> str:
        blob = json.dumps(
            {
                "model": self.model,
                "prompt": [self.prompt_id, self.prompt_sha256],
                "messages": self.messages(with_image_data=False, history=history),
                "sampling": self.sampling,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class LLMResult:
    answer: Optional[dict]  # the validated JSON object, None on failure
    raw: str = ""  # the last raw text
    error: Optional[str] = None  # reject reason: not_in_cache, llm_invalid_output, endpoint_error, ...
    detail: str = ""
    requests_sent: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, read from the provider's prefix cache
    logprobs: Optional[list] = None  # [[token, logprob], ...] of the last answer, when asked
    pending: Optional[tuple] = None  # batch backends: (attempt, the request line asked in a batch)


_CACHES: dict[str, ResponseCache] = {}
_CACHES_LOCK = threading.Lock()


def shared_cache(root: Optional[str]) -> ResponseCache:
    """One cache per folder per process: its write buffer and read LRU outlive a batch,
    not a run (a long-lived worker's next run lists the folder afresh)."""
    from transforms.run.process_state import on_run_end

    with _CACHES_LOCK:
        cache = _CACHES.get(root or "")
        if cache is None:
            cache = _CACHES[root or ""] = ResponseCache(root)
            if root:
                atexit.register(_close_quietly, cache)
            on_run_end(_end_of_run)
        return cache


def _end_of_run() -> None:
    """Write what the caches still buffer and forget them (a Dask worker outlives a run)."""
    with _CACHES_LOCK:
        caches = list(_CACHES.values())
        _CACHES.clear()
    for cache in caches:
        _close_quietly(cache)


def _close_quietly(cache: ResponseCache) -> None:
    try:
        cache.close()
    except Exception as e:  # noqa: BLE001 - at exit: say so, the answers are paid again next time
        log.warning("LLM cache %s: last answers not written: %s", cache.root, e)


# --------------------------------------------------------------------------------------
# Answer parsing
# --------------------------------------------------------------------------------------


# A fenced block: ``` or ```json, up to the next fence.
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)
# Answers longer than this are not parsed: a REW answer is well under 10 kB.
MAX_ANSWER_CHARS = 200_000


def parse_answer(text: str) -> tuple[Optional[Any], str]:
    """(value, "") for exactly one JSON document in an answer: the whole text, or the one
    fenced (```json) block it holds; else (None, why). Text with several objects or
    several fenced blocks is refused, never mined for the first object that parses: a
    model that quotes an injected caption's object next to its own answer must not have
    the quoted one taken. Nesting and length are capped (`formats.safe_json`)."""
    text = (text or "").strip()
    if len(text) > MAX_ANSWER_CHARS:
        return None, f"answer of {len(text):,} characters > {MAX_ANSWER_CHARS:,}"
    try:
        return safe_json.loads(text), ""
    except safe_json.JSONError as e:
        if e.reason == "json_too_deep":
            return None, e.detail
    blocks = _FENCE.findall(text)
    if len(blocks) > 1:
        return None, f"{len(blocks)} fenced blocks in the answer; expected exactly one JSON object"
    if len(blocks) == 1:
        try:
            return safe_json.loads(blocks[0].strip()), ""
        except safe_json.JSONError as e:
            return None, f"the fenced block is not JSON ({e.reason}: {e.detail})"[:300]
    n = len(safe_json.raw_decode_all(text))
    if n > 1:
        return None, f"{n} JSON objects in the answer; expected exactly one"
    return None, "no JSON object in the answer" if n == 0 else "text around the JSON object; expected only the object"


def extract_json_object(text: str) -> Optional[Any]:
    """The one JSON document of an answer (see `parse_answer`), or None."""
    return parse_answer(text)[0]


_VALIDATORS: dict[str, Any] = {}


def _validator(schema: dict):
    """A compiled validator per schema: `jsonschema.validate` re-checks the schema itself on
    every call, which costs more than the HTTP round trip on loopback."""
    import jsonschema

    key = json.dumps(schema, sort_keys=True)
    v = _VALIDATORS.get(key)
    if v is None:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        v = _VALIDATORS[key] = cls(schema)
    return v


def entry_text(entry) -> str:
    """The answer text of a cache entry or completion ("" when it has none: a damaged
    entry is an invalid answer, not a crash)."""
    text = entry.get("text") if isinstance(entry, dict) else None
    return text if isinstance(text, str) else ""


def validate_answer(text: str, schema: dict) -> tuple[Optional[dict], str]:
    """(object, "") when the text holds a JSON object valid under `schema`, else (None, why)."""
    import jsonschema

    if not isinstance(text, str):
        return None, f"the answer is a {type(text).__name__}, not text"
    obj, why = parse_answer(text)
    if why:
        return None, why
    try:
        _validator(schema).validate(obj)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        return None, f"schema violation at {where}: {e.message}"[:500]
    return obj, ""


def settle(result, raw: str, answer, why: str, history: list, count_invalid: bool = True) -> Optional[list]:
    """Record one answer of a request's re-ask chain on `result` (every backend's step):
    None when it is valid (the chain ends), else the history that re-asks, with `why`."""
    result.raw = raw
    if answer is not None:
        result.answer = answer
        return None
    if count_invalid:
        _DeferredCounter("llm_invalid_answers").inc()
    result.detail = why
    return history + reask_message(raw, why)


def reask_message(raw: str, why: str) -> list[dict]:
    return [
        {"role": "assistant", "content": raw[:4000]},
        {
            "role": "user",
            "content": f"That answer is not valid: {why}. Answer again with only the JSON object, exactly as the schema says.",
        },
    ]


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


# The structured-output form each server accepted, shared by every stage in this process.
_LEARNED_DIALECT: dict[str, str] = {}


class _Endpoint:
    """An OpenAI-compatible server as the "model" Beam loads: its URL and key, and one event
    loop in a background thread holding one HTTP session, so connections are reused across
    batches instead of being opened again for every batch."""

    def __init__(self, url: str, api_key: Optional[str], dialect: str, max_concurrency: int, timeout_s: float,
                 budget: Optional[BudgetSpec] = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._first = dialect
        spec = budget or BudgetSpec(max_concurrency=max_concurrency)
        # The connection pool holds what this process may ever have in flight.
        self._max_concurrency = spec.max_concurrency
        self._timeout_s = timeout_s
        self.budget = Budget(spec, registry_for(spec))
        self._loop = asyncio.new_event_loop()
        # Cache reads run on these threads: as many as requests may be in flight.
        from concurrent.futures import ThreadPoolExecutor

        self._loop.set_default_executor(ThreadPoolExecutor(max(8, min(64, spec.max_concurrency)), thread_name_prefix="llm-cache"))
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-http", daemon=True)
        self._thread.start()
        self._session = None
        atexit.register(self.close)

    def run(self, coro_fn):
        """Run `coro_fn(session)` on the endpoint's loop and wait for its result."""

        async def call():
            if self._session is None:
                import aiohttp

                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                    connector=aiohttp.TCPConnector(limit=self._max_concurrency),
                )
            return await coro_fn(self._session)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown():
            if self._session is not None:
                await self._session.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @property
    def dialect(self) -> str:
        return _LEARNED_DIALECT.get(self.url, self._first)

    @dialect.setter
    def dialect(self, value: str) -> None:
        _LEARNED_DIALECT[self.url] = value


_KEYS: dict[tuple, Optional[str]] = {}


def api_key(env: Optional[str], secret: Optional[str] = None, secret_endpoint: Optional[str] = None) -> Optional[str]:
    """The API key, where the code runs: from Secret Manager when `secret` names one (read
    once per process), else from the environment variable `env`; registered for redaction."""
    if secret:
        from transforms.run.secrets import read_secret

        cache_key = (secret, secret_endpoint)
        if cache_key not in _KEYS:
            _KEYS[cache_key] = read_secret(secret, secret_endpoint)
        return _KEYS[cache_key]
    key = os.environ.get(env) if env else None
    register_secret(key)
    return key or None


_ENDPOINTS: dict[tuple, _Endpoint] = {}
_ENDPOINTS_LOCK = threading.Lock()


def shared_endpoint(url: str, api_key: Optional[str], dialect: str, timeout_s: float, spec: BudgetSpec) -> _Endpoint:
    """One endpoint per process for each server and budget: the verify and the rationale
    stages share its connections, its event loop and its part of the job's budget."""
    fingerprint = hashlib.sha256((api_key or "").encode()).hexdigest()
    key = (url, fingerprint, timeout_s, spec)
    with _ENDPOINTS_LOCK:
        endpoint = _ENDPOINTS.get(key)
        if endpoint is None or endpoint._loop.is_closed():
            endpoint = _ENDPOINTS[key] = _Endpoint(url, api_key, dialect, spec.max_concurrency, timeout_s, spec)
        return endpoint


def _chat_url(url: str) -> str:
    """The chat-completions URL of an endpoint; a query string (some gateways take their
    key as `?api_key=`) stays at the end."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        # A base URL that names its API version (`/v1`, `/v1beta`) or is an OpenAI-compatible
        # root (Gemini's `/v1beta/openai`) gets the route; a bare host gets `/v1` first.
        versioned = re.search(r"/(v\d+\w*|openai)$", path) is not None
        path = path + ("/chat/completions" if versioned else "/v1/chat/completions")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def _split_credentials(url: str, key: Optional[str]) -> tuple[str, Optional[tuple[str, str]]]:
    """(URL without user info, (user, password) for HTTP basic auth or None). With an API
    key the key is sent as a bearer token and user info in the URL is dropped (HTTP allows
    one Authorization header)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if key:
        log.warning("--endpoint carries user info and an API key is set: the key is used, the user info dropped")
        return bare, None
    return bare, (unquote(parts.username), unquote(parts.password or ""))


def _response_format(dialect: str, schema: dict, name: str) -> Optional[dict]:
    # Strict structured outputs know no conditional subschemas (`allOf` / `if`): the server
    # is given the shape, and the answer is checked against the whole schema here.
    schema = {k: v for k, v in schema.items() if k != "allOf"}
    if dialect == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    if dialect == "json_object":
        return {"type": "json_object", "schema": schema}
    return None


def chat_body(req: LLMRequest, history: Sequence[dict] = (), dialect: str = "json_schema") -> dict:
    """The chat-completions request body: the same for the online and the batch backends."""
    body = {"model": req.model, "messages": req.messages(history=history), **req.sampling}
    rf = _response_format(dialect, req.schema, req.prompt_id.replace("/", "_"))
    if rf is not None:
        body["response_format"] = rf
    return body


def completion_entry(payload: dict, dialect: str) -> dict:
    """A chat completion as the cache stores it; KeyError/IndexError/TypeError when it is not one."""
    message = payload["choices"][0]["message"]
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise TypeError(f"message content is a {type(content).__name__}, not text")
    raw_usage = payload.get("usage")
    usage = {}
    if isinstance(raw_usage, dict):
        usage = {k: v for k, v in raw_usage.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        cached = _cached_tokens(raw_usage)
        if cached:
            usage["cached_tokens"] = cached
    model = payload.get("model")
    entry = {"text": content, "usage": usage, "model": model if isinstance(model, str) else None, "dialect": dialect}
    logprobs = _token_logprobs(payload["choices"][0])
    if logprobs is not None:
        entry["logprobs"] = logprobs
    return entry


# A REW answer is a few hundred tokens; a longer list is cut (the verdict comes early).
MAX_LOGPROB_TOKENS = 4096


def _token_logprobs(choice) -> Optional[list]:
    """[[token, logprob], ...] from a choice's `logprobs.content` (OpenAI's and vLLM's
    form), None when absent or not that shape."""
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list):
        return None
    out = []
    for t in content[:MAX_LOGPROB_TOKENS]:
        tok = t.get("token") if isinstance(t, dict) else None
        value = t.get("logprob") if isinstance(t, dict) else None
        if not isinstance(tok, str) or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return None
        out.append([tok, float(value)])
    return out


def value_probability(text: str, logprobs: Optional[list], key: str) -> Optional[float]:
    """The probability the model gave the string value of `key` in its JSON answer: exp of
    the summed logprobs of the tokens that spell it (for "verdict": how sure it was of
    "correct" against the other verdicts). None without logprobs, or when the tokens do not
    spell the answer's text (then nothing is known about its confidence)."""
    if not logprobs or not isinstance(text, str):
        return None
    if "".join(tok for tok, _ in logprobs) != text:
        return None
    m = re.search('"' + re.escape(key) + r'"\s*:\s*"', text)
    if m is None:
        return None
    start = m.end()
    end = text.find('"', start)
    if end < 0:
        return None
    end = max(end, start + 1)  # an empty value: the token that closes it
    total, pos, hit = 0.0, 0, False
    for tok, lp in logprobs:
        a, b = pos, pos + len(tok)
        pos = b
        if b > start and a < end:
            total += lp
            hit = True
        if a >= end:
            break
    return math.exp(total) if hit else None


def _cached_tokens(usage: dict) -> int:
    """Prompt tokens served from the provider's prefix cache: OpenAI's and vLLM's
    `prompt_tokens_details.cached_tokens`, Gemini's `cached_content_token_count`."""
    details = usage.get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    if value is None:
        value = usage.get("cached_content_token_count")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class _Failure(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool, status: Optional[int] = None, retry_after: Optional[float] = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


# Statuses that say "slow down": their retries do not count against --max_retries but
# against --max_rate_limit_wait (seconds of waiting in total for one request).
RATE_LIMIT_STATUS = {429, 503}
MAX_RETRY_AFTER_S = 600.0


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """A Retry-After header (delay seconds or an HTTP date) as seconds from now, capped at
    MAX_RETRY_AFTER_S; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class OpenAICompatibleHandler(ModelHandler[LLMRequest, LLMResult, _Endpoint]):
    def __init__(
        self,
        endpoint: str,
        *,
        cache_dir: Optional[str] = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_rate_limit_wait_s: float = 900.0,
        max_reasks: int = 1,
        dialect: str = "json_schema",
        batch_size: int = 64,
        total_concurrency: int = 0,
        requests_per_minute: float = 0.0,
        tokens_per_minute: float = 0.0,
        budget_dir: Optional[str] = None,
        budget_refresh_s: float = 10.0,
        expected_processes: int = 1,
        image_token_rule: str = "openai",
        api_key_secret: Optional[str] = None,
        secret_manager_endpoint: Optional[str] = None,
    ):
        # Fixed batches: Beam's adaptive batching would start at 1 element, and a batch of 1
        # leaves all but one of the `max_concurrency` slots idle for a whole round trip.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.endpoint = endpoint
        self.cache_dir = cache_dir
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_rate_limit_wait_s = max_rate_limit_wait_s
        self.max_reasks = max_reasks
        self.dialect = dialect
        self.total_concurrency = total_concurrency
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.budget_dir = budget_dir
        self.budget_refresh_s = budget_refresh_s
        self.expected_processes = expected_processes
        self.image_token_rule = image_token_rule
        self.api_key_secret = api_key_secret
        self.secret_manager_endpoint = secret_manager_endpoint

    def budget_spec(self) -> BudgetSpec:
        return BudgetSpec(
            max_concurrency=self.max_concurrency,
            total_concurrency=self.total_concurrency,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            registry=self.budget_dir,
            refresh_s=self.budget_refresh_s,
            expected_members=self.expected_processes,
        )

    def load_model(self) -> _Endpoint:
        # Read here, on the worker: the key never travels in the pickled pipeline. It is
        # registered for redaction: a server that echoes it in an error does not put it
        # into a reject or a log line.
        from transforms.run.secrets import install_log_redaction

        key = api_key(self.api_key_env, self.api_key_secret, self.secret_manager_endpoint)
        install_log_redaction()
        return shared_endpoint(self.endpoint, key, self.dialect, self.timeout_s, self.budget_spec())

    def get_metrics_namespace(self) -> str:
        return "llm_openai"

    def run_inference(
        self, batch: Sequence[LLMRequest], model: _Endpoint, inference_args: Optional[dict] = None
    ) -> Iterable[PredictionResult]:
        cache = shared_cache(self.cache_dir)
        batch = list(batch)

        async def run_batch(session):
            # Sent grouped (one entity's requests back to back), answered in batch order.
            order = sorted(range(len(batch)), key=lambda i: str(batch[i].group or ""))
            answers = await asyncio.gather(*(self._one(batch[i], model, cache, session) for i in order))
            results = [None] * len(batch)
            for i, res in zip(order, answers):
                results[i] = res
            # The batch's answers are stored before its results go on (off the event loop).
            await asyncio.get_running_loop().run_in_executor(None, cache.flush)
            return results

        results = model.run(run_batch)
        flush_counts()
        for req, res in zip(batch, results):
            yield PredictionResult(req, res, req.model)

    async def _one(self, req: LLMRequest, endpoint, cache, session) -> LLMResult:
        result = LLMResult(answer=None)
        history: list[dict] = []
        for _attempt in range(self.max_reasks + 1):
            key = req.cache_key(history)
            # A blocking read (object store) on a worker thread, not on the event loop.
            entry = await asyncio.get_running_loop().run_in_executor(None, cache.get, key) if cache.root else None
            if entry is not None:
                answer, why = validate_answer(entry_text(entry), req.schema)
                if answer is None and isinstance(entry.get("invalid"), str):
                    # An invalid answer this backend got and marked: its re-ask chain goes on
                    # from the cache, as replay's does, and is not paid for again.
                    result.cache_hits += 1
                    _DeferredCounter("llm_cache_hits").inc()
                elif answer is None:
                    # A cached answer that fails validation (a poisoned or older cache) is a
                    # miss: asked again, and the new answer replaces it.
                    _DeferredCounter("llm_cache_invalid").inc()
                    entry = None
                else:
                    result.cache_hits += 1
                    _DeferredCounter("llm_cache_hits").inc()
            if entry is None:
                try:
                    entry = await self._post_with_retries(req, history, endpoint, session)
                except _Failure as f:
                    result.error, result.detail = f.reason, f.detail
                    return result
                result.requests_sent += 1
                result.prompt_tokens += entry.get("usage", {}).get("prompt_tokens", 0) or 0
                result.completion_tokens += entry.get("usage", {}).get("completion_tokens", 0) or 0
                result.cached_tokens += entry.get("usage", {}).get("cached_tokens", 0) or 0
                # Validated before it is cached; an invalid answer is kept too (marked), so
                # `--llm_backend replay` follows the same re-ask chain to the same outcome.
                answer, why = validate_answer(entry_text(entry), req.schema)
                cache.put(key, entry if answer is not None else {**entry, "invalid": why})
            result.logprobs = entry.get("logprobs")
            history = settle(result, entry_text(entry), answer, why, history)
            if history is None:
                return result
        result.error = "llm_invalid_output"
        return result

    def _reserve(self, req: LLMRequest, history) -> float:
        """Tokens a request may use, held against --max_tokens_per_minute until its usage is known."""
        if not self.tokens_per_minute:
            return 0.0
        text = req.text + req.text_after + "".join(str(m.get("content", "")) for m in history)
        t, i = request_tokens(text, req.image, self.image_token_rule)
        return float(t + i + int(req.sampling.get("max_tokens") or 0))

    async def _post_with_retries(self, req, history, endpoint, session) -> dict:
        """One request, retried: errors up to --max_retries times with full-jitter backoff;
        "slow down" answers (429, 503) for as long as --max_rate_limit_wait allows, each
        wait at least the server's Retry-After, and the process's send rate lowered (the
        job-wide budget, `llm_budget.Budget`). A slot of the budget is held only while a
        request is on the wire, not while it waits to be retried. A request given up on
        says how many tries and how long it waited."""
        budget = endpoint.budget
        delay = self.backoff_s
        errors = 0
        tries = 0
        waited = 0.0
        reserve = self._reserve(req, history)
        while True:
            queued = await budget.acquire(reserve)
            _DeferredCounter("llm_budget_wait_ms_total").inc(int(queued * 1000))
            tries += 1
            entry = None
            try:
                entry = await self._post(req, history, endpoint, session)
            except _Failure as f:
                failure = f
            finally:
                used = None
                if entry is not None:
                    usage = entry.get("usage") or {}
                    used = float((usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)) or None
                await budget.release(reserve, used)
            if entry is not None:
                budget.on_answer()
                return entry
            f = failure
            limited = f.status in RATE_LIMIT_STATUS
            if not limited:
                errors += 1
            if limited and f.retry_after is not None:
                # The server said when: wait that long (plus a little jitter, so the requests
                # it refused together do not come back together); the process's pace is
                # lowered by the budget, not by growing each request's wait.
                wait = f.retry_after + random.uniform(0, 0.1 * max(f.retry_after, 1.0))
            else:
                wait = random.uniform(0, min(self.max_backoff_s, delay))  # full jitter
                delay *= 2
            out_of_budget = (errors > self.max_retries) if not limited else (waited + wait > self.max_rate_limit_wait_s)
            if not f.retryable or out_of_budget:
                if f.retryable:
                    f.detail = f"{f.detail} (gave up after {tries} tries and {waited:.1f} s of waiting)"
                raise f
            if limited:
                _DeferredCounter("llm_rate_limited").inc()
                budget.on_rate_limited()
            _DeferredCounter("llm_retries").inc()
            waited += wait
            await asyncio.sleep(wait)

    async def _post(self, req: LLMRequest, history, endpoint: _Endpoint, session) -> dict:
        import aiohttp

        headers = {"Content-Type": "application/json"}
        url, basic = _split_credentials(endpoint.url, endpoint.api_key)
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        elif basic is not None:
            register_secret(basic[1])
            headers["Authorization"] = aiohttp.BasicAuth(*basic).encode()
        dialects = DIALECTS[DIALECTS.index(endpoint.dialect) :]
        for dialect in dialects:
            body = chat_body(req, history, dialect)
            rf = body.get("response_format")
            started = time.perf_counter()
            try:
                async with session.post(_chat_url(url), json=body, headers=headers) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    text = await resp.text()
            except TimeoutError as e:
                _DeferredCounter("llm_timeouts").inc()
                raise _Failure("endpoint_timeout", f"no answer within {self.timeout_s} s", True) from e
            except aiohttp.ClientError as e:
                raise _Failure("endpoint_unreachable", f"{type(e).__name__}: {e}"[:300], True) from e
            _DeferredCounter("llm_requests").inc()
            _DeferredCounter("llm_latency_ms_total").inc(int((time.perf_counter() - started) * 1000))
            if status == 200:
                try:
                    entry = completion_entry(safe_json.loads(text), dialect)
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                    raise _Failure("endpoint_bad_response", f"not a chat completion: {text[:200]!r}", False) from e
                endpoint.dialect = dialect
                return entry
            # A server that does not speak this structured-output form answers 400/422 (or
            # 500, llama.cpp): try the next, simpler form before treating it as an error.
            low = text.lower()
            refused = rf is not None and (
                status in (400, 422) or (status == 500 and any(w in low for w in ("response_format", "schema", "grammar")))
            )
            if refused:
                log.info("endpoint refused response_format %s (HTTP %s); trying the next form", dialect, status)
                continue
            raise _Failure(
                "endpoint_error" if status not in RETRYABLE_STATUS else f"http_{status}",
                f"HTTP {status}: {text[:300]}",
                status in RETRYABLE_STATUS,
                status,
                retry_after_seconds(retry_after),
            )
        raise _Failure("endpoint_error", "the server refused every structured-output form", False)


class ReplayHandler(ModelHandler[LLMRequest, LLMResult, ResponseCache]):
    """Answers from the cache only; a miss is `not_in_cache`. Reproduces a published run."""

    def __init__(self, cache_dir: str, max_reasks: int = 1, batch_size: int = 64):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.cache_dir = cache_dir
        self.max_reasks = max_reasks

    def load_model(self) -> ResponseCache:
        return shared_cache(self.cache_dir)

    def get_metrics_namespace(self) -> str:
        return "llm_replay"

    def run_inference(self, batch, model: ResponseCache, inference_args=None):
        for req in batch:
            yield PredictionResult(req, replay_one(req, model, self.max_reasks), req.model)
        flush_counts()


def replay_one(req: LLMRequest, cache: ResponseCache, max_reasks: int) -> LLMResult:
    result = LLMResult(answer=None)
    history: list[dict] = []
    for _ in range(max_reasks + 1):
        entry = cache.get(req.cache_key(history))
        if entry is None:
            result.error, result.detail = "not_in_cache", f"no cached answer for {req.prompt_id} (key {req.cache_key(history)[:16]})"
            return result
        result.cache_hits += 1
        raw = entry_text(entry)
        result.logprobs = entry.get("logprobs")
        history = settle(result, raw, *validate_answer(raw, req.schema), history, count_invalid=False)
        if history is None:
            return result
    result.error = "llm_invalid_output"
    return result
