"""Gemini through Vertex AI batch prediction (`refine --llm_backend vertex_batch`): the
provider behind the resumable rounds of `transforms/llm/batch.py`, which also drives the
OpenAI Batch API. Only the provider differs:

* a round's pending request lines (OpenAI batch JSONL, as written for every batch backend)
  become Gemini `GenerateContentRequest`s, one `{"request": ...}` line each, staged as one
  JSONL file on Cloud Storage (`--vertex_staging`, a gs:// folder Vertex AI can read);
* a `batchPredictionJobs` job is created over REST for that file (model
  `publishers/google/models/<--model>`), its output under the same folder;
* polling maps the job's state to the rounds' vocabulary (running, completed, expired,
  cancelled, failed; PARTIALLY_SUCCEEDED is completed: the lines that did not come back are
  found missing and asked again);
* each output line carries the request as it was sent, so the request's key travels in
  its `labels` (`entityforge_key`: the first 63 hex digits of the cache key) and the
  answer goes back to the right sample whatever the output order;
* a Gemini response becomes the chat completion the cache stores (text, token usage with
  `cachedContentTokenCount` as cached tokens).

Credentials are the Application Default Credentials of the machine (what every Google
client library uses: `gcloud auth application-default login`, a service account on
Dataflow); an API root on loopback (`--vertex_endpoint http://127.0.0.1:PORT`, a test's
fake) is reached without credentials. A job is created once per request file: before
creating one, a job of the same display name is looked for and adopted, so a retried
bundle or a lost reply does not start (and pay for) a second job.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Optional
from urllib.parse import quote, urlsplit

from transforms.formats import safe_json

log = logging.getLogger(__name__)

KEY_LABEL = "entityforge_key"
LABEL_MAX = 63
STATES = {
    "JOB_STATE_SUCCEEDED": "completed",
    "JOB_STATE_PARTIALLY_SUCCEEDED": "completed",
    "JOB_STATE_FAILED": "failed",
    "JOB_STATE_CANCELLED": "cancelled",
    "JOB_STATE_EXPIRED": "expired",
}
_DATA_URL = re.compile(r"^data:([\w/+.-]+);base64,(.*)$", re.S)


def label_of(key: str) -> str:
    """A cache key as a label value (lower-case hex, at most 63 characters)."""
    return key[:LABEL_MAX]


def gemini_request(body: dict, key: str) -> dict:
    """An OpenAI chat-completions body -> a Gemini GenerateContentRequest carrying `key`."""
    contents = []
    for message in body.get("messages", []):
        role = "model" if message.get("role") == "assistant" else "user"
        content = message.get("content")
        parts = []
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or []:
            if part.get("type") == "text":
                parts.append({"text": part.get("text", "")})
            elif part.get("type") == "image_url":
                m = _DATA_URL.match(part.get("image_url", {}).get("url", ""))
                if m:
                    parts.append({"inlineData": {"mimeType": m.group(1), "data": m.group(2)}})
        contents.append({"role": role, "parts": parts})
    config = {"responseMimeType": "application/json"}
    for ours, theirs in (("temperature", "temperature"), ("max_tokens", "maxOutputTokens"), ("seed", "seed")):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    return {"contents": contents, "generationConfig": config, "labels": {KEY_LABEL: label_of(key)}}


def chat_completion(response: dict, model: Optional[str]) -> dict:
    """A Gemini GenerateContentResponse -> the chat completion the cache stores; KeyError /
    IndexError / TypeError when it has no candidate text."""
    candidate = response["candidates"][0]
    text = "".join(p.get("text", "") for p in candidate["content"]["parts"] if isinstance(p, dict))
    u = response.get("usageMetadata") or {}
    usage = {"prompt_tokens": int(u.get("promptTokenCount") or 0), "completion_tokens": int(u.get("candidatesTokenCount") or 0),
             "prompt_tokens_details": {"cached_tokens": int(u.get("cachedContentTokenCount") or 0)}}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}], "usage": usage,
            "model": response.get("modelVersion") or model}


def result_lines(text: str, ids: list[str], model: Optional[str]) -> str:
    """Vertex output lines -> OpenAI batch output lines (custom_id, response or error) for
    `read_results`; a line whose key is not one of `ids` is dropped with a warning."""
    by_label = {label_of(i): i for i in ids}
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = safe_json.loads(line)
            label = rec["request"]["labels"][KEY_LABEL]
        except (ValueError, KeyError, TypeError):
            log.warning("a Vertex output line carries no %s label: skipped", KEY_LABEL)
            continue
        cid = by_label.get(label)
        if cid is None:
            log.warning("a Vertex output line answers a request this job did not send: skipped")
            continue
        status = rec.get("status")
        response = rec.get("response")
        if status or not isinstance(response, dict):
            out.append({"custom_id": cid, "error": {"message": str(status or "no response")[:300]}, "response": {}})
            continue
        try:
            body = chat_completion(response, model)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            out.append({"custom_id": cid, "error": {"message": f"no candidate text: {str(response)[:200]}"}, "response": {}})
            continue
        out.append({"custom_id": cid, "response": {"status_code": 200, "body": body}, "error": None})
    return "".join(json.dumps(r) + "\n" for r in out)


class VertexBatches:
    """Vertex AI batch prediction as a provider of the batch rounds (see the module doc)."""

    def __init__(self, project: str, location: str, staging: str, endpoint: Optional[str] = None, timeout_s: float = 120.0,
                 max_retries: int = 5):
        self.project, self.location = project, location
        self.staging = staging.rstrip("/")
        self.root = (endpoint or f"https://{location}-aiplatform.googleapis.com").rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._session = None

    # -- HTTP -------------------------------------------------------------------------
    def session(self):
        """requests with urllib3's retries on GET (429 and 5xx, back-off); authorised with the
        Application Default Credentials unless the API root is on loopback."""
        if self._session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            host = urlsplit(self.root).hostname or ""
            if host in ("127.0.0.1", "localhost", "::1"):
                session = requests.Session()
            else:
                import google.auth
                from google.auth.transport.requests import AuthorizedSession

                credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
                session = AuthorizedSession(credentials)
            retry = Retry(total=self.max_retries, backoff_factor=1.0, status_forcelist=(429, 500, 502, 503, 504),
                          allowed_methods=frozenset({"GET"}), respect_retry_after_header=True)
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            self._session = session
        return self._session

    def _jobs_url(self) -> str:
        return f"{self.root}/v1/projects/{self.project}/locations/{self.location}/batchPredictionJobs"

    def _call(self, method: str, url: str, **kw) -> dict:
        r = self.session().request(method, url, timeout=self.timeout_s, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"Vertex AI {method} {url.split('?')[0]}: HTTP {r.status_code}: {r.text[:300]}")
        return safe_json.loads(r.text or "{}")

    # -- the provider interface of transforms/llm/batch.py -------------------------------
    def submit(self, name: str, data: bytes) -> dict:
        from apache_beam.io.filesystems import FileSystems

        from transforms.io.retry import retry_call

        lines = [json.loads(x) for x in data.decode("utf-8").splitlines() if x.strip()]
        model = lines[0]["body"]["model"] if lines else ""
        staged = "".join(json.dumps({"request": gemini_request(x["body"], x["custom_id"])}, ensure_ascii=False) + "\n"
                         for x in lines).encode("utf-8")
        input_uri = f"{self.staging}/{name}/input.jsonl"

        def write():
            with FileSystems.create(input_uri) as f:
                f.write(staged)

        retry_call(write, input_uri)
        job = self._find(name)
        if job is None:
            job = self._call("POST", self._jobs_url(), json={
                "displayName": f"entityforge-{name}",
                "model": f"publishers/google/models/{model}",
                "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": [input_uri]}},
                "outputConfig": {"predictionsFormat": "jsonl", "gcsDestination": {"outputUriPrefix": f"{self.staging}/{name}/output"}},
            })
        return {"id": job["name"], "status": STATES.get(job.get("state", ""), "running"), "input_uri": input_uri, "model": model}

    def _find(self, name: str) -> Optional[dict]:
        """A job created earlier for this request file (same display name), unless it failed."""
        flt = quote(f'display_name="entityforge-{name}"')
        found = self._call("GET", f"{self._jobs_url()}?filter={flt}").get("batchPredictionJobs") or []
        alive = [j for j in found if j.get("state") not in ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED")]
        return alive[0] if alive else None

    def poll(self, record: dict) -> dict:
        job = self._call("GET", f"{self.root}/v1/{record['id']}")
        status = STATES.get(job.get("state", ""), "running")
        return {"status": status, "errors": json.dumps(job.get("error") or {})[:300],
                "output_dir": (job.get("outputInfo") or {}).get("gcsOutputDirectory")}

    def results(self, record: dict, polled: dict, ids: list[str]) -> list[str]:
        from apache_beam.io.filesystems import FileSystems

        from transforms.io.retry import retry_call

        folder = polled.get("output_dir")
        if not folder:
            return []
        texts = []
        for m in sorted(FileSystems.match([f"{folder.rstrip('/')}/predictions*.jsonl"])[0].metadata_list, key=lambda m: m.path):
            def read(path=m.path):
                with FileSystems.open(path) as f:
                    return f.read().decode("utf-8")

            texts.append(result_lines(retry_call(read, m.path), ids, record.get("model")))
        return texts
