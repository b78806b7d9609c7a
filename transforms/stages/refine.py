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
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from prompts import Prompt, render_rationale_qa, render_verify
from transforms.formats.files import Skip, open_read
from transforms.formats.media import mime_type
from transforms.formats.shards import iter_shard_records, read_images_at
from transforms.io.images import DEFAULT_LLM_MAX_SIDE, ImageError, image_for_llm
from transforms.io.readers import REJECTED
from transforms.io.retry import read_guarded, retry_call
from transforms.llm.client import LLMRequest, LLMResult
from transforms.run.progress import counter as progress_counter
from transforms.schema import Reject, Sample, from_row, truncate_json
from transforms.stages.ground import Grounder, Grounding

log = logging.getLogger(__name__)

def _counter(name: str):
    return progress_counter(name)


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


@dataclasses.dataclass
class Located:
    """A sample and where its image lies in its shard (`file`, `ref` as in
    `formats.shards.read_images_at`), so the sample can cross a shuffle without its image and get
    it back, one ranged read, where the image is needed."""

    sample: Sample
    file: str
    ref: str


class ReadSamples(beam.DoFn):
    """Shards written by decontaminate -> Located (the Sample without its image bytes):
    Parquet row groups (path, rg), every column but the image; webdataset tars (KEY.json
    with every other field), image members skipped and located."""

    STAGE = "read_samples"

    def process(self, element):
        unit = element if isinstance(element, tuple) else (element, -1)
        path = unit[0]

        def unreadable(e):
            # A file that is not a shard is a reject; I/O errors are retried, then raised.
            _counter("sample_files_unreadable").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED, Reject(stage=self.STAGE, reason="unreadable_file", detail=f"{type(e).__name__}: {e}"[:500], source=path, count=0)
            )

        def read():
            for item in iter_shard_records(unit, locate_images=True):
                if isinstance(item, Skip):
                    yield from self._skip(item, path)
                    continue
                _counter("samples_read").inc()
                sample = from_row(Sample, {**item.row, "image": b""})
                if item.ref is None:
                    yield _reject(self.STAGE, "image_missing", f"{sample.key}: no image member", sample)
                    continue
                yield Located(sample, path, item.ref)

        yield from read_guarded(read, path, unreadable)

    def _skip(self, skip: Skip, path: str):
        if skip.reason == "broken_archive":
            # The samples before the damage went on; the rest of the tar is one reject.
            _counter("sample_files_broken").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED, Reject(stage=self.STAGE, reason="broken_archive", detail=skip.detail, source=path, count=0)
            )
            return
        _counter("samples_read").inc()
        yield beam.pvalue.TaggedOutput(
            REJECTED, Reject(stage=self.STAGE, reason=skip.reason, detail=skip.detail[:1000], source=path)
        )


class ReadShardImages(beam.DoFn):
    """(file, [(Located, summary)]) -> (Located with its image bytes, summary): each shard
    file is opened once and only the images asked for are read. A location without an
    image is a reject; I/O errors are raised, so the runner retries."""

    def __init__(self, stage: str):
        self.stage = stage

    def process(self, element):
        path, items = element
        items = sorted(items, key=lambda it: it[0].ref)
        refs = sorted({loc.ref for loc, _ in items})
        images, missing = retry_call(lambda: read_images_at(path, refs, "image"), path)
        for located, summary in items:
            data = images.get(located.ref)
            if data is None:
                yield _reject(self.stage, "image_missing", f"{path} {located.ref}: {missing.get(located.ref, 'no image')}", located.sample)
                continue
            yield dataclasses.replace(located, sample=dataclasses.replace(located.sample, image=data)), summary


class WithImages(beam.PTransform):
    """(Located, summary) without image bytes -> the same with them, read back by shard
    file; only the small records cross the shuffle."""

    def __init__(self, stage: str, step: str):
        super().__init__()
        self.stage = stage
        self.step = step

    def expand(self, pcoll):
        from transforms.run.shuffles import MeasureShuffle

        return (
            pcoll
            | "ByShard" >> beam.Map(lambda it: (it[0].file, it))
            | "MeasureByShard" >> MeasureShuffle(self.step)
            | "GroupByShard" >> beam.GroupByKey()
            | "ReadImages" >> beam.ParDo(ReadShardImages(self.stage)).with_outputs(REJECTED, main="items")
        )


def catalog_summary(entity) -> tuple:
    """Entity -> (qid, (position in the catalog, summary)): a repeated QID keeps its first
    occurrence in file order, the rule build_entity_index applies, so prompts and cache keys
    do not depend on the order a shuffle delivers them in."""
    return entity.qid, ((entity.file_index, entity.row), entity.summary)


def attach_summary(element):
    """(qid, {"sample": [...], "summary": [(position, summary)]}) -> (sample, summary or None)."""
    _qid, joined = element
    entries = sorted(joined["summary"], key=lambda e: e[0])
    summary = (entries[0][1] or None) if entries else None
    for sample in joined["sample"]:
        yield sample, summary


@dataclasses.dataclass
class RequestSettings:
    model: str
    mode: str
    context: str
    sampling: dict
    # Longer image side sent to the LLM (0 = as stored); see images.image_for_llm.
    max_image_side: int = DEFAULT_LLM_MAX_SIDE


def _request(sample: Sample, tag, text: str, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    image, mime = sample.image, mime_type(sample.image_format)
    if image:
        try:
            image, mime = image_for_llm(image, s.max_image_side)
        except ImageError:
            pass  # sent as stored: the endpoint's answer (or refusal) is the record's outcome
    return LLMRequest(
        model=s.model,
        prompt_id=prompt.id,
        prompt_sha256=prompt.sha256,
        text=text,
        image=image,
        image_mime=mime,
        schema=prompt.schema,
        sampling=s.sampling,
        tag=tag,
    )


def _unpack(element) -> tuple[Sample, Optional[str]]:
    first, summary = element
    return (first.sample if isinstance(first, Located) else first), summary


def verify_request(element, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    """(Sample or Located, summary) -> the verify request (tag: the element)."""
    sample, summary = _unpack(element)
    text = render_verify(prompt, caption=sample.caption, title=sample.title, summary=summary, mode=s.mode, context=s.context)
    return _request(sample, element, text, prompt, s)


def rationale_request(element, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    sample, summary = _unpack(element)
    text = render_rationale_qa(prompt, entity=sample.title, summary=summary, caption=sample.caption, context=s.context)
    return _request(sample, element, text, prompt, s)


def _count_usage(result: LLMResult):
    _counter("llm_requests_sent").inc(result.requests_sent)
    _counter("llm_cache_hits_total").inc(result.cache_hits)
    _counter("llm_prompt_tokens").inc(result.prompt_tokens)
    _counter("llm_completion_tokens").inc(result.completion_tokens)


PENDING_TAG = "pending"


class _InterpretAnswer(beam.DoFn):
    """PredictionResult(LLMRequest, LLMResult) -> `accept(...)`'s outputs, or a reject with
    the backend's reason and the raw answer. Token usage is counted either way."""

    STAGE = ""

    def __init__(self, prompt: Prompt):
        self.prompt_tag = f"{prompt.id}@{prompt.sha256[:12]}"

    # Whether accepted samples go on without their image bytes (they cross a shuffle next).
    STRIP_IMAGE = True

    def process(self, pr: PredictionResult):
        req, result = pr.example, pr.inference
        first, summary = req.tag
        located = first if isinstance(first, Located) else None
        sample = located.sample if located else first
        _count_usage(result)
        if result.error == "pending_batch":
            # Asked in a provider batch (llm_batch): the sample waits for the next round.
            _counter(f"batch_pending_{self.STAGE}").inc()
            yield beam.pvalue.TaggedOutput(PENDING_TAG, result.pending)
            return
        if result.error:
            yield _reject(self.STAGE, result.error, result.detail, sample, {"raw": result.raw})
            return
        for out in self.accept(req, sample, summary, result.answer):
            yield self._relocate(out, located)

    def _relocate(self, out, located: Optional[Located]):
        if located is None:
            return out

        def wrap(s: Sample):
            if not self.STRIP_IMAGE:
                return s
            return dataclasses.replace(located, sample=dataclasses.replace(s, image=b""))

        if isinstance(out, Sample):
            return wrap(out)
        if isinstance(out, beam.pvalue.TaggedOutput) and out.tag == "ground":
            base, name = out.value
            return beam.pvalue.TaggedOutput("ground", (wrap(base), name))
        return out

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
    """(Sample or Located, LLM name) -> (name, candidate qid)."""
    first, name = element
    sample = first.sample if isinstance(first, Located) else first
    return name, sample.candidate_qid


def json_item(element) -> tuple:
    """{"text": ..., "candidate_qid"?: ...} -> (text, candidate qid)."""
    return str(element.get("text") or ""), element.get("candidate_qid") or element.get("qid")


class GroundingHandler(ModelHandler[object, Grounding, Grounder]):
    """element -> (element, Grounding) against the entity index (titles, then embeddings).
    `item_fn` picks (name, candidate qid) out of an element."""

    def __init__(
        self,
        entity_index: str,
        text_model: str,
        min_score: float,
        threads=0,
        item_fn=sample_name_item,
        share_across_processes: bool = False,
    ):
        # Shared: the title tables, the faiss index and the encoder are held once per
        # machine and every SDK process calls into them.
        super().__init__(min_batch_size=1, max_batch_size=256, large_model=share_across_processes)
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


def load_grounder(entity_index: str, text_model: Optional[str] = None, threads=0) -> Grounder:
    from transforms.models.embedding import load_faiss_index, load_sentence_transformer
    from transforms.stages.build_entity_index import ENTITIES_FILE, INDEX_FILE, read_manifest

    manifest = read_manifest(entity_index)
    with open_read(f"{entity_index}/{ENTITIES_FILE}") as f:
        table = pq.read_table(f, columns=["int_id", "qid", "title"])
    from transforms.models.text_encoder import index_encoder

    model = load_sentence_transformer(text_model or index_encoder(manifest, entity_index), threads=threads)
    index = load_faiss_index(f"{entity_index}/{INDEX_FILE}", threads, params=manifest.get("search", {}).get("params", {}))

    def encode(texts):
        return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    return Grounder.from_table(table, encode, index)


class ApplyGrounding(beam.DoFn):
    STAGE = "ground"

    def process(self, element):
        (first, name), g = element
        located = first if isinstance(first, Located) else None
        sample = located.sample if located else first
        if g.qid is None:
            yield _reject(self.STAGE, "ungrounded", f"{name!r} matches no catalog entity", sample, {"llm_entity": name})
            return
        _counter(f"grounded_{g.method}").inc()
        grounded = dataclasses.replace(
            sample,
            qid=g.qid,
            title=g.title,
            changed=g.qid != sample.candidate_qid,
            verdict="correct" if g.qid == sample.candidate_qid else "corrected",
            grounding_method=g.method,
            grounding_score=float(g.score),
            ambiguous_qids=json.dumps(g.ambiguous) if g.ambiguous else None,
        )
        yield dataclasses.replace(located, sample=grounded) if located else grounded


class InterpretRationale(_InterpretAnswer):
    STAGE = "rationale_qa"
    STRIP_IMAGE = False  # the refined sample, image and all, goes to the shard writers

    def accept(self, req, sample, summary, a):
        _counter("samples_refined").inc()
        yield dataclasses.replace(
            sample,
            rationale=a["rationale"],
            qa_json=json.dumps(a["qa"], ensure_ascii=False),
            summary_missing=bool(sample.summary_missing) or summary is None,
            rationale_prompt=self.prompt_tag,
        )



ESTIMATE_COUNTERS = (
    "estimate_samples", "estimate_verify_text_tokens", "estimate_rationale_text_tokens", "estimate_image_tokens",
    "estimate_images", "estimate_images_without_size",
)


class EstimateTokens(beam.DoFn):
    """(Located, summary) -> nothing; counts what refine would send for the sample: the
    verify prompt's text tokens, the rationale prompt's (as if the candidate were kept),
    and the image's tokens at its size after the downscale refine applies (from the
    sample's width and height: no image is read; a sample without them is counted as a
    `max_image_side` square and in `estimate_images_without_size`)."""

    def __init__(self, verify_prompt: Prompt, rationale_prompt: Prompt, settings: RequestSettings, rule: str):
        self.verify_prompt = verify_prompt
        self.rationale_prompt = rationale_prompt
        self.s = settings
        self.rule = rule

    def process(self, element):
        from transforms.llm.cost import image_tokens, text_tokens

        sample, summary = _unpack(element)
        s = self.s
        verify = render_verify(self.verify_prompt, caption=sample.caption, title=sample.title, summary=summary, mode=s.mode, context=s.context)
        rationale = render_rationale_qa(self.rationale_prompt, entity=sample.title, summary=summary, caption=sample.caption, context=s.context)
        _counter("estimate_samples").inc()
        _counter("estimate_verify_text_tokens").inc(text_tokens(verify))
        _counter("estimate_rationale_text_tokens").inc(text_tokens(rationale))
        width, height = sample.width or 0, sample.height or 0
        side = s.max_image_side
        if width <= 0 or height <= 0:
            _counter("estimate_images_without_size").inc()
            width = height = side or DEFAULT_LLM_MAX_SIDE
        elif side > 0 and max(width, height) > side:
            scale = side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        _counter("estimate_images").inc()
        _counter("estimate_image_tokens").inc(image_tokens(width, height, self.rule))
        return ()
