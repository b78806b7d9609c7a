"""REW through a provider's batch API (`refine --llm_backend openai_batch` for the OpenAI
Batch API, `vertex_batch` for Gemini on Vertex AI, transforms/llm/vertex.py): the same
requests, cache, interpretation and rejects as the online backend, at batch prices.

A batch run is resumable and goes in rounds, each an ordinary refine pipeline:

1. **Answer from the cache or ask**: `BatchRequestHandler` answers every request whose
   answer is in the cache (exactly as `replay` does, re-asks included); a request not
   there becomes a *pending* request line (OpenAI batch JSONL: `custom_id` = the request's
   cache key, `body` = the chat-completions body the online backend sends) instead of an
   HTTP call. Its sample stops there for this round.
2. **Submit** (`SubmitBatches`, on the workers): pending lines are grouped into files of at
   most `--batch_max_requests` lines and `--batch_max_mb` MB (OpenAI: 50,000 / 200 MB),
   written under `<output>/_batch/requests/`, uploaded with the Files API and submitted as
   batches; each batch's record goes to `<output>/_batch/batches/<file>.json`. A file is
   named by the hash of its request ids: a retried bundle finds its record and does not
   submit (or pay for) the same file twice.
3. **Collect** (`collect`, on the launcher when the next round starts): every submitted
   batch is polled; a finished one's output file is read into the cache, and every
   request that did not come back (an error line, a line missing from an expired or
   cancelled batch, a failed batch) is recorded in `<output>/_batch/failures/`. The next
   round asks those again (a new batch); after `--batch_max_resubmits` re-submissions a
   request is rejected as `batch_failed` with the provider's last reason.

The run ends when a round has nothing pending: its manifest is written as for an online
run, with the tokens the batches used and their cost at batch prices next to online
prices. With `--wait` one command runs all rounds, polling every `--batch_poll` seconds.

The request files are the JSONL `vllm run-batch` reads (`--batch_submit no` writes them
without uploading); `--batch_results` reads the output files it writes back into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from transforms.formats import safe_json
from transforms.io.retry import retry_call
from transforms.llm.cache import _match, _read, _write_atomic
from transforms.llm.client import (
    LLMRequest,
    LLMResult,
    api_key,
    chat_body,
    completion_entry,
    entry_text,
    settle,
    shared_cache,
    validate_answer,
)
from transforms.run.progress import counter

log = logging.getLogger(__name__)

BATCH_DIR = "_batch"
PENDING = "pending_batch"
RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}
FINISHED = {"completed", "expired", "cancelled", "failed"}
CHAT_URL = "/v1/chat/completions"



def batch_dir(output: str) -> str:
    return f"{output.rstrip('/')}/{BATCH_DIR}"


@dataclass(frozen=True)
class BatchClientSpec:
    """How workers and the launcher reach the provider (the key is read where used).
    `provider` "openai": the Files + Batches API at `endpoint`; "vertex": Vertex AI batch
    prediction (`vertex_*`; the request files staged under `vertex_staging`)."""

    endpoint: Optional[str] = None
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    api_key_secret: Optional[str] = None
    secret_manager_endpoint: Optional[str] = None
    timeout_s: float = 600.0
    max_retries: int = 5
    provider: str = "openai"
    vertex_project: Optional[str] = None
    vertex_location: str = "us-central1"
    vertex_staging: Optional[str] = None
    vertex_endpoint: Optional[str] = None

    def client(self):
        """The provider: submit(name, data) -> record fields, poll(record) -> status, and
        results(record, polled, ids) -> output texts in the OpenAI batch output format."""
        if self.provider == "vertex":
            from transforms.llm.vertex import VertexBatches

            return VertexBatches(self.vertex_project, self.vertex_location, self.vertex_staging, self.vertex_endpoint,
                                 min(self.timeout_s, 120.0), self.max_retries)
        import openai

        from transforms.llm.client import _chat_url

        base = _chat_url(self.endpoint)[: -len("/chat/completions")]
        key = api_key(self.api_key_env, self.api_key_secret, self.secret_manager_endpoint)
        return OpenAIBatches(openai.OpenAI(base_url=base, api_key=key or "none", timeout=self.timeout_s,
                                           max_retries=self.max_retries))


class OpenAIBatches:
    """The OpenAI Files + Batches API through the `openai` client (its retries on connection
    errors, 408/409/429/5xx with back-off, and typed errors)."""

    def __init__(self, client):
        self.c = client

    def submit(self, name: str, data: bytes) -> dict:
        uploaded = self.c.files.create(file=(f"{name}.jsonl", data), purpose="batch")
        created = self.c.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT_URL, completion_window="24h",
            metadata={"tool": "entityforge", "request_file": name},
        )
        return {"id": created.id, "input_file_id": uploaded.id, "status": created.status}

    def poll(self, record: dict) -> dict:
        batch = self.c.batches.retrieve(record["id"])
        return {"status": batch.status, "errors": f"{batch.errors}"[:300], "files": [batch.output_file_id, batch.error_file_id]}

    def results(self, record: dict, polled: dict, ids: list[str]) -> list[str]:
        return [self.c.files.content(fid).content.decode("utf-8") for fid in polled["files"] if fid]


# --------------------------------------------------------------------------------------
# Round step 1: answer from the cache, or make a pending request line
# --------------------------------------------------------------------------------------


def load_failures(folder: str) -> dict[str, tuple[int, str]]:
    """custom_id -> (times it did not come back, last reason), from every collected batch."""
    failures: dict[str, tuple[int, str]] = {}
    for m in sorted(_match(f"{folder}/failures/*.jsonl"), key=lambda m: m.path):
        for line in _read(m.path).decode("utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            n, _ = failures.get(rec["custom_id"], (0, ""))
            failures[rec["custom_id"]] = (n + 1, f"{rec['reason']}: {rec.get('detail', '')}"[:500])
    return failures


class _Model:
    """What a worker holds: the cache and the requests that did not come back (Beam keeps
    models by weak reference: a plain tuple cannot be one)."""

    def __init__(self, cache, failures: dict):
        self.cache, self.failures = cache, failures


class BatchRequestHandler(ModelHandler[LLMRequest, LLMResult, _Model]):
    def __init__(self, cache_dir: str, folder: str, max_reasks: int = 1, max_resubmits: int = 2, batch_size: int = 256):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.cache_dir = cache_dir
        self.folder = folder
        self.max_reasks = max_reasks
        self.max_resubmits = max_resubmits

    def load_model(self):
        return _Model(shared_cache(self.cache_dir), load_failures(self.folder))

    def get_metrics_namespace(self) -> str:
        return "llm_batch"

    def run_inference(self, batch: Sequence[LLMRequest], model, inference_args=None) -> Iterable[PredictionResult]:
        cache, failures = model.cache, model.failures
        for req in batch:
            yield PredictionResult(req, self._one(req, cache, failures), req.model)

    def _one(self, req: LLMRequest, cache, failures) -> LLMResult:
        result = LLMResult(answer=None)
        history: list[dict] = []
        for _ in range(self.max_reasks + 1):
            key = req.cache_key(history)
            entry = cache.get(key)
            if entry is None:
                failed, why = failures.get(key, (0, ""))
                if failed > self.max_resubmits:
                    result.error, result.detail = "batch_failed", f"no answer after {failed} batches; last: {why}"
                    return result
                result.error = PENDING
                result.detail = f"asked in a batch (attempt {failed + 1})"
                # (attempt, line): a re-submission is a new file, not the one already sent.
                result.pending = (failed + 1, json.dumps(
                    {"custom_id": key, "method": "POST", "url": CHAT_URL, "body": chat_body(req, history)},
                    ensure_ascii=False, sort_keys=True,
                ))
                return result
            result.cache_hits += 1
            raw = entry_text(entry)
            history = settle(result, raw, *validate_answer(raw, req.schema), history)
            if history is None:
                return result
        result.error = "llm_invalid_output"
        return result


# --------------------------------------------------------------------------------------
# Round step 2: submit (workers)
# --------------------------------------------------------------------------------------


class SubmitBatch(beam.DoFn):
    """A list of (attempt, pending request line) -> one request file, uploaded and submitted as one
    batch (or only written, with `submit` False); its record under batches/."""

    def __init__(self, folder: str, spec: Optional[BatchClientSpec], run_id: str):
        self.folder = folder
        self.spec = spec
        self.run_id = run_id
        self._client = None

    def setup(self):
        if self.spec is not None:
            self._client = self.spec.client()

    def process(self, lines):
        unique: dict[str, str] = {}
        attempts: dict[str, int] = {}
        for attempt, line in lines:
            cid = json.loads(line)["custom_id"]
            unique.setdefault(cid, line)
            attempts[cid] = attempt
        ids = sorted(unique)
        # Named by what it asks (ids and attempts): a retried bundle finds its own record.
        name = hashlib.sha256("\n".join(f"{i}:{attempts[i]}" for i in ids).encode()).hexdigest()[:32]
        record_path = f"{self.folder}/batches/{name}.json"
        if not FileSystems.exists(record_path):  # else a retried bundle: already submitted
            yield self._submit(name, record_path, ids, unique)

    def _submit(self, name, record_path, ids, unique) -> dict:
        request_file = f"{self.folder}/requests/{name}.jsonl"
        data = "".join(unique[i] + "\n" for i in ids).encode("utf-8")
        retry_call(lambda: _write_atomic(request_file, data), request_file)
        record = {"name": name, "request_file": request_file, "requests": len(ids), "bytes": len(data),
                  "run": self.run_id, "submitted_at": time.time(), "status": "written"}
        if self._client is not None:
            record.update(self._client.submit(name, data))
            counter("batches_submitted").inc()
        retry_call(lambda: _write_atomic(record_path, json.dumps(record, indent=1).encode()), record_path)
        counter("batch_requests_submitted").inc(len(ids))
        return record


class PackLines(beam.DoFn):
    """(attempt, request line) -> lists of at most `max_requests` lines and `max_bytes` bytes, packed
    within a bundle (`BatchElements` bounds one of the two only, and starts small)."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests, self.max_bytes = max_requests, max_bytes

    def start_bundle(self):
        self._lines, self._bytes = [], 0

    def process(self, item):
        size = len(item[1].encode("utf-8")) + 1
        if self._lines and (len(self._lines) >= self.max_requests or self._bytes + size > self.max_bytes):
            yield self._lines
            self._lines, self._bytes = [], 0
        self._lines.append(item)
        self._bytes += size

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        if self._lines:
            yield WindowedValue(self._lines, 0, [GlobalWindow()])
            self._lines, self._bytes = [], 0


class SubmitBatches(beam.PTransform):
    def __init__(self, folder: str, spec: Optional[BatchClientSpec], max_requests: int, max_bytes: int, run_id: str):
        super().__init__()
        self.folder, self.spec, self.max_requests, self.max_bytes, self.run_id = folder, spec, max_requests, max_bytes, run_id

    def expand(self, lines):
        return (
            lines
            | "PackLines" >> beam.ParDo(PackLines(self.max_requests, self.max_bytes))
            | "Submit" >> beam.ParDo(SubmitBatch(self.folder, self.spec, self.run_id))
        )


# --------------------------------------------------------------------------------------
# Round step 3: collect (launcher)
# --------------------------------------------------------------------------------------


def _request_ids(path: str) -> list[str]:
    return [json.loads(line)["custom_id"] for line in _read(path).decode("utf-8").splitlines() if line.strip()]


def read_results(text: str, cache, usage: dict) -> tuple[set[str], list[dict]]:
    """Batch output / error lines -> answers into `cache`; (answered ids, failure records)."""
    answered, failures = set(), []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = safe_json.loads(line)
            cid = rec["custom_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("batch result line is not JSON with a custom_id: skipped")
            continue
        response = rec.get("response")
        response = response if isinstance(response, dict) else {}
        status = response.get("status_code")
        if status == 200 and not rec.get("error"):
            try:
                entry = completion_entry(response["body"], "json_schema")
            except (KeyError, IndexError, TypeError, AttributeError):
                failures.append({"custom_id": cid, "reason": "batch_bad_response", "detail": str(response)[:300]})
                continue
            cache.put(cid, entry)
            answered.add(cid)
            u = entry.get("usage") or {}
            usage["input"] += u.get("prompt_tokens") or 0
            usage["output"] += u.get("completion_tokens") or 0
        else:
            err = rec.get("error") or (response.get("body") or {}).get("error") or {}
            reason = f"batch_http_{status}" if status else "batch_error"
            failures.append({"custom_id": cid, "reason": reason, "detail": json.dumps(err)[:300]})
    return answered, failures


def collect(folder: str, cache_dir: str, spec: Optional[BatchClientSpec], results: Sequence[str] = ()) -> dict:
    """Poll every submitted batch not yet collected; read finished ones into the cache and
    record what did not come back. `results`: output files of `vllm run-batch` (or any
    batch output) to read as well. Returns counts, `running` the batches still going."""
    cache = shared_cache(cache_dir)
    client = spec.client() if spec is not None else None
    summary = {"running": 0, "collected": 0, "answers": 0, "failed": 0, "usage": {"input": 0, "output": 0}}
    for path in results:
        text = _read(path).decode("utf-8")
        answered, _ = read_results(text, cache, summary["usage"])
        summary["answers"] += len(answered)
    for m in sorted(_match(f"{folder}/batches/*.json"), key=lambda m: m.path):
        record = json.loads(_read(m.path).decode("utf-8"))
        if record.get("collected") or "id" not in record or client is None:
            continue
        polled = client.poll(record)
        status = polled["status"]
        record["status"] = status
        if status in RUNNING or status == "running":
            summary["running"] += 1
            continue
        usage = {"input": 0, "output": 0}
        answered: set[str] = set()
        failures: list[dict] = []
        ids = _request_ids(record["request_file"])
        for text in client.results(record, polled, ids):
            got, failed = read_results(text, cache, usage)
            answered |= got
            failures += failed
        reported = answered | {f["custom_id"] for f in failures}
        why = {"expired": "the batch expired before this request ran", "cancelled": "the batch was cancelled",
               "failed": f"the batch failed: {polled.get('errors')}"[:300]}.get(status, "not in the batch's output")
        for cid in ids:
            if cid not in reported:
                failures.append({"custom_id": cid, "reason": f"batch_{status}" if status != "completed" else "batch_missing",
                                 "detail": why})
        cache.flush()  # the answers are stored before the batch counts as collected
        if failures:
            path = f"{folder}/failures/{record['name']}-{uuid.uuid4().hex[:8]}.jsonl"
            data = "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode()
            retry_call(lambda path=path, data=data: _write_atomic(path, data), path)
        record.update(collected=time.time(), answered=len(answered), failed=len(failures), usage=usage)
        _write_atomic(m.path, json.dumps(record, indent=1).encode())
        summary["collected"] += 1
        summary["answers"] += len(answered)
        summary["failed"] += len(failures)
        for k in usage:
            summary["usage"][k] += usage[k]
    cache.flush()
    return summary


def batch_totals(folder: str) -> dict:
    """Batches, requests and tokens over every batch of this output (for the manifest)."""
    totals = {"batches": 0, "requests": 0, "answered": 0, "failed": 0, "tokens": {"input": 0, "output": 0}}
    for m in _match(f"{folder}/batches/*.json"):
        record = json.loads(_read(m.path).decode("utf-8"))
        totals["batches"] += 1
        totals["requests"] += record.get("requests", 0)
        totals["answered"] += record.get("answered", 0)
        totals["failed"] += record.get("failed", 0)
        for k in ("input", "output"):
            totals["tokens"][k] += (record.get("usage") or {}).get(k, 0)
    return totals
