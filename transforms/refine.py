"""The REW recipe as Beam pieces: read shards, build the prompts, interpret the answers,
ground corrected names, and assemble the refined samples.

Flow per sample:
  verify(image, caption, candidate title, candidate summary)
    correct        -> final entity = candidate
    corrected      -> ground the LLM's name to a catalog QID (ungrounded -> reject)
    not_an_entity  -> reject
  rationale_qa(image, final entity, its summary, caption) -> rationale + QA pairs
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Optional

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from prompts import Prompt, render_rationale_qa, render_verify
from transforms.common import METRICS_NAMESPACE, open_read
from transforms.grounding import Grounder, Grounding
from transforms.llm import LLMRequest, LLMResult
from transforms.readers import REJECTED, iter_webdataset
from transforms.schema import Reject, Sample, from_row, truncate_json

log = logging.getLogger(__name__)

MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif", "bmp": "image/bmp", "tif": "image/tiff"}


def _counter(name: str):
    return Metrics.counter(METRICS_NAMESPACE, name)


def _reject(stage, reason, detail, sample: Optional[Sample] = None, extra: Optional[dict] = None):
    record = {} if sample is None else {
        "key": sample.key, "qid": sample.qid, "title": sample.title, "caption": sample.caption, "url": sample.url,
    }
    record.update(extra or {})
    return beam.pvalue.TaggedOutput(
        REJECTED,
        Reject(
            stage=stage,
            reason=reason,
            detail=detail[:1000],
            key=None if sample is None else sample.key,
            source=None if sample is None else sample.source,
            record_json=truncate_json(record, limit=8000),
        ),
    )


class ReadSamples(beam.DoFn):
    """Shards written by decontaminate -> Sample: Parquet row groups (path, rg) or webdataset
    tars (KEY.<image>, KEY.json with every other field)."""

    STAGE = "read_samples"

    def process(self, element):
        try:
            if isinstance(element, tuple):
                path, rg = element
                with open_read(path) as f:
                    table = pq.ParquetFile(f).read_row_group(rg)
                for row in table.to_pylist():
                    _counter("samples_read").inc()
                    yield from_row(Sample, row)
            else:
                for key, parts in iter_webdataset(open_read(element)):
                    _counter("samples_read").inc()
                    try:
                        meta = json.loads(parts["json"].decode("utf-8"))
                    except (KeyError, UnicodeDecodeError, ValueError) as e:
                        yield _reject(self.STAGE, "bad_json", f"{key}: {e}")
                        continue
                    image = next((parts[e] for e in ("jpg", "png", "webp", "gif", "bmp", "tif", "img") if e in parts), None)
                    if image is None:
                        yield _reject(self.STAGE, "image_missing", f"{key}: no image member")
                        continue
                    yield from_row(Sample, {**meta, "image": image})
        except Exception as e:  # noqa: BLE001
            _counter("sample_files_unreadable").inc()
            src = element[0] if isinstance(element, tuple) else element
            yield beam.pvalue.TaggedOutput(
                REJECTED, Reject(stage=self.STAGE, reason="unreadable_file", detail=f"{type(e).__name__}: {e}"[:500], source=src, count=0)
            )


def attach_summary(element):
    """(qid, {"sample": [...], "summary": [...]}) -> (Sample, summary or None)."""
    _qid, joined = element
    summaries = [s for s in joined["summary"] if s]
    summary = summaries[0] if summaries else None
    for sample in joined["sample"]:
        yield sample, summary


@dataclasses.dataclass
class RequestSettings:
    model: str
    mode: str
    context: str
    sampling: dict


def _request(sample: Sample, summary, text: str, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    return LLMRequest(
        model=s.model,
        prompt_id=prompt.id,
        prompt_sha256=prompt.sha256,
        text=text,
        image=sample.image,
        image_mime=MIME.get(sample.image_format, "image/jpeg"),
        schema=prompt.schema,
        sampling=s.sampling,
        tag=(sample, summary),
    )


def verify_request(element, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    sample, summary = element
    text = render_verify(prompt, caption=sample.caption, title=sample.title, summary=summary, mode=s.mode, context=s.context)
    return _request(sample, summary, text, prompt, s)


def rationale_request(element, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    sample, summary = element
    text = render_rationale_qa(prompt, entity=sample.title, summary=summary, caption=sample.caption, context=s.context)
    return _request(sample, summary, text, prompt, s)


def _count_usage(result: LLMResult):
    _counter("llm_requests_sent").inc(result.requests_sent)
    _counter("llm_cache_hits_total").inc(result.cache_hits)
    _counter("llm_prompt_tokens").inc(result.prompt_tokens)
    _counter("llm_completion_tokens").inc(result.completion_tokens)


class _InterpretAnswer(beam.DoFn):
    """PredictionResult(LLMRequest, LLMResult) -> `accept(...)`'s outputs, or a reject with
    the backend's reason and the raw answer. Token usage is counted either way."""

    STAGE = ""

    def __init__(self, prompt: Prompt):
        self.prompt_tag = f"{prompt.id}@{prompt.sha256[:12]}"

    def process(self, pr: PredictionResult):
        req, result = pr.example, pr.inference
        sample, summary = req.tag
        _count_usage(result)
        if result.error:
            yield _reject(self.STAGE, result.error, result.detail, sample, {"raw": result.raw})
            return
        yield from self.accept(req, sample, summary, result.answer)

    def accept(self, req, sample, summary, answer):
        raise NotImplementedError


class InterpretVerify(_InterpretAnswer):
    """`correct` -> the Sample (final = candidate); `corrected` -> ("ground", (Sample,
    name)); `not_an_entity` -> a reject."""

    STAGE = "verify"

    def accept(self, req, sample, summary, a):
        verdict = a["verdict"]
        _counter(f"verdict_{verdict}").inc()
        base = dataclasses.replace(
            sample,
            candidate_qid=sample.qid,
            candidate_title=sample.title,
            verdict=verdict,
            llm_entity=a.get("entity") or None,
            verify_reason=a.get("reason"),
            summary_missing=summary is None,
            llm_model=req.model,
            verify_prompt=self.prompt_tag,
        )
        if verdict == "not_an_entity":
            yield _reject(self.STAGE, "not_an_entity", a.get("reason", ""), sample, {"answer": a})
        elif verdict == "correct":
            yield dataclasses.replace(base, changed=False, grounding_method="verified", grounding_score=1.0)
        else:
            yield beam.pvalue.TaggedOutput("ground", (base, a.get("entity") or ""))


def sample_name_item(element) -> tuple:
    """(Sample, LLM name) -> (name, candidate qid)."""
    sample, name = element
    return name, sample.candidate_qid


def json_item(element) -> tuple:
    """{"text": ..., "candidate_qid"?: ...} -> (text, candidate qid)."""
    return str(element.get("text") or ""), element.get("candidate_qid") or element.get("qid")


class GroundingHandler(ModelHandler[object, Grounding, Grounder]):
    """element -> (element, Grounding) against the entity index (titles, then embeddings).
    `item_fn` picks (name, candidate qid) out of an element."""

    def __init__(self, entity_index: str, text_model: str, min_score: float, threads: int = 0, item_fn=sample_name_item):
        super().__init__(min_batch_size=1, max_batch_size=256)
        self.entity_index = entity_index.rstrip("/")
        self.text_model = text_model
        self.min_score = min_score
        self.threads = threads
        self.item_fn = item_fn

    def load_model(self) -> Grounder:
        return load_grounder(self.entity_index, self.text_model, self.threads)

    def run_inference(self, batch, model: Grounder, inference_args=None):
        items = [self.item_fn(e) for e in batch]
        yield from zip(batch, model.ground_many(items, self.min_score))

    def get_metrics_namespace(self) -> str:
        return "grounding"


def load_grounder(entity_index: str, text_model: Optional[str] = None, threads: int = 0) -> Grounder:
    from transforms.embedding import load_faiss_index, load_sentence_transformer
    from transforms.entity_index import ENTITIES_FILE, INDEX_FILE, read_manifest

    manifest = read_manifest(entity_index)
    with open_read(f"{entity_index}/{ENTITIES_FILE}") as f:
        table = pq.read_table(f, columns=["int_id", "qid", "title"])
    rows = zip(table["int_id"].to_pylist(), table["qid"].to_pylist(), table["title"].to_pylist())
    model = load_sentence_transformer(text_model or manifest["model"], threads=threads)
    index = load_faiss_index(f"{entity_index}/{INDEX_FILE}", threads)

    def encode(texts):
        return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    return Grounder(list(rows), encode, index)


class ApplyGrounding(beam.DoFn):
    STAGE = "ground"

    def process(self, element):
        (sample, name), g = element
        if g.qid is None:
            yield _reject(self.STAGE, "ungrounded", f"{name!r} matches no catalog entity", sample, {"llm_entity": name})
            return
        _counter(f"grounded_{g.method}").inc()
        yield dataclasses.replace(
            sample,
            qid=g.qid,
            title=g.title,
            changed=g.qid != sample.candidate_qid,
            verdict="correct" if g.qid == sample.candidate_qid else "corrected",
            grounding_method=g.method,
            grounding_score=float(g.score),
            ambiguous_qids=json.dumps(g.ambiguous) if g.ambiguous else None,
        )


class InterpretRationale(_InterpretAnswer):
    STAGE = "rationale_qa"

    def accept(self, req, sample, summary, a):
        _counter("samples_refined").inc()
        yield dataclasses.replace(
            sample,
            rationale=a["rationale"],
            qa_json=json.dumps(a["qa"], ensure_ascii=False),
            summary_missing=bool(sample.summary_missing) or summary is None,
            rationale_prompt=self.prompt_tag,
        )

