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
from apache_beam.ml.inference.base import PredictionResult

from prompts import Prompt, render_rationale_qa, render_verify, split_image
from transforms.formats.files import Skip
from transforms.formats.media import mime_type
from transforms.formats.shards import iter_shard_records, read_images_at
from transforms.io.images import DEFAULT_LLM_MAX_SIDE, ImageError, image_for_llm
from transforms.io.readers import REJECTED
from transforms.io.retry import read_guarded, retry_call
from transforms.llm.client import LLMRequest, LLMResult, value_probability
from transforms.llm.cost import image_tokens, text_tokens
from transforms.run.progress import counter
from transforms.run.shuffles import MeasureShuffle
from transforms.schema import Reject, Sample, from_row, truncate_json

log = logging.getLogger(__name__)


def _reject(stage, reason, detail, sample: Optional[Sample] = None, extra: Optional[dict] = None):
    record = {} if sample is None else {
        "key": sample.key, "qid": sample.qid, "title": sample.title, "caption": sample.caption, "url": sample.url,
        "score": sample.score,
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
            counter("sample_files_unreadable").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED, Reject(stage=self.STAGE, reason="unreadable_file", detail=f"{type(e).__name__}: {e}"[:500], source=path, count=0)
            )

        def read():
            for item in iter_shard_records(unit, locate_images=True):
                if isinstance(item, Skip):
                    yield from self._skip(item, path)
                    continue
                counter("samples_read").inc()
                sample = from_row(Sample, {**item.row, "image": b""})
                if item.ref is None:
                    yield _reject(self.STAGE, "image_missing", f"{sample.key}: no image member", sample)
                    continue
                yield Located(sample, path, item.ref)

        yield from read_guarded(read, path, unreadable)

    def _skip(self, skip: Skip, path: str):
        if skip.reason == "broken_archive":
            # The samples before the damage went on; the rest of the tar is one reject.
            counter("sample_files_broken").inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED, Reject(stage=self.STAGE, reason="broken_archive", detail=skip.detail, source=path, count=0)
            )
            return
        counter("samples_read").inc()
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


class WithSummary(beam.PTransform):
    """Located samples -> (Located, the entity's summary or None), joined by QID with the
    catalog's `summaries` (`catalog_summary` pairs); with `images` = (stage, step) each
    sample's image bytes are then read back from its shard file (`WithImages`). Refine runs
    it twice: for the candidate entity before verify, for the final one before the
    rationale. -> {"items": ..., "rejected": ...}; without images {"items": ...}."""

    def __init__(self, summaries, step: str, images: Optional[tuple[str, str]] = None):
        super().__init__()
        self.summaries = summaries
        self.step = step
        self.images = images

    def expand(self, located):

        joined = (
            {
                "sample": located
                | "ByQid" >> beam.Map(lambda loc: (loc.sample.qid, loc))
                | "MeasureSamples" >> MeasureShuffle(self.step),
                "summary": self.summaries | "MeasureSummaries" >> MeasureShuffle(self.step),
            }
            | "Join" >> beam.CoGroupByKey()
            | "Attach" >> beam.FlatMap(attach_summary)
        )
        if self.images is None:
            return {"items": joined}
        read = joined | "Images" >> WithImages(*self.images)
        return {"items": read["items"], "rejected": read[REJECTED]}


@dataclasses.dataclass
class RequestSettings:
    model: str
    mode: str
    context: str
    sampling: dict
    # Longer image side sent to the LLM (0 = as stored); see images.image_for_llm.
    max_image_side: int = DEFAULT_LLM_MAX_SIDE


def _request(sample: Sample, tag, text: str, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    """The request of a rendered prompt: the text before the prompt's image marker, the
    image (downscaled), the text after it; grouped by the entity the prompt is about."""
    image, mime = sample.image, mime_type(sample.image_format)
    before, after = split_image(text)
    if image:
        try:
            image, mime = image_for_llm(image, s.max_image_side)
        except ImageError:
            pass  # sent as stored: the endpoint's answer (or refusal) is the record's outcome
    return LLMRequest(
        model=s.model,
        prompt_id=prompt.id,
        prompt_sha256=prompt.sha256,
        text=before,
        text_after=after,
        group=sample.qid,
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


def rew_request(element, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    """(Sample or Located, summary) -> the one request of `--rew_requests 1` (prompt task
    `rew`: verdict, entity, and the rationale + QA only where the verdict keeps the image)."""
    return verify_request(element, prompt, s)


def rationale_request(element, prompt: Prompt, s: RequestSettings) -> LLMRequest:
    sample, summary = _unpack(element)
    text = render_rationale_qa(prompt, entity=sample.title, summary=summary, caption=sample.caption, context=s.context)
    return _request(sample, element, text, prompt, s)


def _count_usage(result: LLMResult, role: str = ""):
    """Tokens and requests of one answer: job totals (`llm_*`), and for the escalation
    backend also under `llm_escalate_*` (the first backend's share is the difference)."""
    for prefix in ("llm_", f"llm_{role}_") if role else ("llm_",):
        counter(f"{prefix}requests_sent").inc(result.requests_sent)
        counter(f"{prefix}prompt_tokens").inc(result.prompt_tokens)
        counter(f"{prefix}completion_tokens").inc(result.completion_tokens)
        counter(f"{prefix}cached_input_tokens").inc(result.cached_tokens)
    counter("llm_cache_hits_total").inc(result.cache_hits)


PENDING_TAG = "pending"
ESCALATE_TAG = "escalate"
ESCALATE_REASONS = ("low_confidence", "ungrounded", "invalid")


@dataclasses.dataclass(frozen=True)
class Escalation:
    """When a first answer goes to the escalation backend (`refine --escalate_when`):
    `low_confidence` (its verdict's probability from the logprobs < `below`), `ungrounded`
    (its corrected name matches no catalog entity), `invalid` (it failed the schema after
    the re-asks)."""

    when: frozenset
    below: float = 0.0


def escalate(located, sample: Sample, reason: str, **fields):
    """The sample sent on to the escalation backend, without its image bytes (they are read
    back by shard file, like every later stage's), marked with what the first model said."""
    counter(f"escalated_{reason}").inc()
    marked = dataclasses.replace(sample, image=b"", escalated=True, **fields)
    return beam.pvalue.TaggedOutput(ESCALATE_TAG, dataclasses.replace(located, sample=marked) if located else marked)


class _InterpretAnswer(beam.DoFn):
    """PredictionResult(LLMRequest, LLMResult) -> `accept(...)`'s outputs, or a reject with
    the backend's reason and the raw answer. Token usage is counted either way."""

    STAGE = ""

    def __init__(self, prompt: Prompt, escalation: Optional[Escalation] = None, role: str = ""):
        self.prompt_tag = f"{prompt.id}@{prompt.sha256[:12]}"
        # The first backend's interpreter may send answers on (escalation); the escalation
        # backend's (role "escalate") decides.
        self.escalation = escalation
        self.role = role

    # Whether accepted samples go on without their image bytes (they cross a shuffle next).
    STRIP_IMAGE = True

    def process(self, pr: PredictionResult):
        req, result = pr.example, pr.inference
        first, summary = req.tag
        located = first if isinstance(first, Located) else None
        sample = located.sample if located else first
        _count_usage(result, self.role)
        if result.error == "pending_batch":
            # Asked in a provider batch (llm_batch): the sample waits for the next round.
            counter(f"batch_pending_{self.STAGE}").inc()
            yield beam.pvalue.TaggedOutput(PENDING_TAG, result.pending)
            return
        if result.error == "llm_invalid_output" and self.escalates("invalid"):
            yield escalate(located, sample, "invalid", first_verdict="invalid")
            return
        if result.error:
            yield _reject(self.STAGE, result.error, result.detail, sample, {"raw": result.raw})
            return
        for out in self.accept(req, sample, summary, result.answer, result):
            if isinstance(out, beam.pvalue.TaggedOutput) and out.tag == ESCALATE_TAG:
                reason, fields = out.value
                yield escalate(located, sample, reason, **fields)
                continue
            yield self._relocate(out, located)

    def escalates(self, reason: str) -> bool:
        return self.escalation is not None and reason in self.escalation.when

    def _relocate(self, out, located: Optional[Located]):
        if located is None:
            return out

        def wrap(s: Sample, keep_location: bool):
            if self.STRIP_IMAGE:
                return dataclasses.replace(located, sample=dataclasses.replace(s, image=b""))
            # With its image: a final sample goes to the writers as it is; one on its way to
            # grounding keeps its location (it may be escalated, and read back, from there).
            return dataclasses.replace(located, sample=s) if keep_location else s

        if isinstance(out, Sample):
            return wrap(out, False)
        if isinstance(out, beam.pvalue.TaggedOutput) and out.tag == "ground":
            base, name = out.value
            return beam.pvalue.TaggedOutput("ground", (wrap(base, True), name))
        return out

    def accept(self, req, sample, summary, answer, result):
        raise NotImplementedError


class InterpretVerify(_InterpretAnswer):
    """`correct` -> the Sample (final = candidate); `corrected` -> ("ground", (Sample,
    name)); `not_an_entity` -> a reject."""

    STAGE = "verify"

    def accept(self, req, sample, summary, a, result):
        verdict = a["verdict"]
        prob = sample.verdict_prob
        if self.escalation is not None:
            prob = value_probability(result.raw, result.logprobs, "verdict")
            if prob is None:
                counter("llm_answers_without_logprobs").inc()
            elif self.escalates("low_confidence") and prob < self.escalation.below:
                yield beam.pvalue.TaggedOutput(ESCALATE_TAG, ("low_confidence", {"first_verdict": verdict, "verdict_prob": prob}))
                return
        counter(f"verdict_{verdict}").inc()
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
            verdict_prob=prob,
        )
        if verdict == "not_an_entity":
            yield _reject(self.STAGE, "not_an_entity", a.get("reason", ""), sample, {"answer": a})
        elif verdict == "correct":
            yield dataclasses.replace(base, changed=False, grounding_method="verified", grounding_score=1.0)
        else:
            yield beam.pvalue.TaggedOutput("ground", (base, a.get("entity") or ""))


class InterpretRew(InterpretVerify):
    """`--rew_requests 1`: one answer carries the verdict and, where the image is kept,
    the rationale and QA. Outputs as InterpretVerify's (the same rejects, the same
    grounding of corrected names), with the rationale already in the sample; the samples
    keep their image bytes (they go to the shard writers, not through another join)."""

    STRIP_IMAGE = False

    def accept(self, req, sample, summary, a, result):
        written = {
            "rationale": a.get("rationale") or None,
            "qa_json": json.dumps(a.get("qa") or [], ensure_ascii=False),
            "rationale_prompt": self.prompt_tag,
        }
        for out in super().accept(req, sample, summary, a, result):
            if isinstance(out, Sample):
                yield dataclasses.replace(out, **written)
            elif isinstance(out, beam.pvalue.TaggedOutput) and out.tag == "ground":
                base, name = out.value
                yield beam.pvalue.TaggedOutput("ground", (dataclasses.replace(base, **written), name))
            else:
                yield out


def count_refined(element) -> Sample:
    """A sample that leaves refine with its rationale (one-request mode counts it here)."""
    counter("samples_refined").inc()
    return element.sample if isinstance(element, Located) else element


def sample_name_item(element) -> tuple:
    """(Sample or Located, LLM name) -> (name, candidate qid)."""
    first, name = element
    sample = first.sample if isinstance(first, Located) else first
    return name, sample.candidate_qid


class ApplyGrounding(beam.DoFn):
    """(element, name) + its Grounding -> the sample with the catalog entity; an ungrounded
    name is a reject, or with `escalate_ungrounded` (a first backend's answer) goes on to
    the escalation backend."""

    STAGE = "ground"

    def __init__(self, escalate_ungrounded: bool = False):
        self.escalate_ungrounded = escalate_ungrounded

    def process(self, element):
        (first, name), g = element
        located = first if isinstance(first, Located) else None
        sample = located.sample if located else first
        if g.qid is None and self.escalate_ungrounded:
            yield escalate(located, sample, "ungrounded", first_verdict=sample.verdict)
            return
        if g.qid is None:
            yield _reject(self.STAGE, "ungrounded", f"{name!r} matches no catalog entity", sample, {"llm_entity": name})
            return
        counter(f"grounded_{g.method}").inc()
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

    def accept(self, req, sample, summary, a, result):
        counter("samples_refined").inc()
        yield dataclasses.replace(
            sample,
            rationale=a["rationale"],
            qa_json=json.dumps(a["qa"], ensure_ascii=False),
            summary_missing=bool(sample.summary_missing) or summary is None,
            rationale_prompt=self.prompt_tag,
        )



ESTIMATE_COUNTERS = (
    "estimate_samples", "estimate_verify_text_tokens", "estimate_rationale_text_tokens", "estimate_rew_text_tokens",
    "estimate_image_tokens", "estimate_images", "estimate_images_without_size",
)


class EstimateTokens(beam.DoFn):
    """(Located, summary) -> nothing; counts what refine would send for the sample: the
    verify prompt's text tokens, the rationale prompt's (as if the candidate were kept),
    and the image's tokens at its size after the downscale refine applies (from the
    sample's width and height: no image is read; a sample without them is counted as a
    `max_image_side` square and in `estimate_images_without_size`). The one-request prompt's
    text and the image at each of `sides` (`estimate_image_tokens_at_<side>`) are counted
    too, for the designs table."""

    def __init__(self, verify_prompt: Prompt, rationale_prompt: Prompt, settings: RequestSettings, rule: str,
                 rew_prompt: Optional[Prompt] = None, sides: tuple = ()):
        self.verify_prompt = verify_prompt
        self.rationale_prompt = rationale_prompt
        self.rew_prompt = rew_prompt
        self.s = settings
        self.rule = rule
        self.sides = tuple(sides)

    def process(self, element):

        sample, summary = _unpack(element)
        s = self.s
        verify = render_verify(self.verify_prompt, caption=sample.caption, title=sample.title, summary=summary, mode=s.mode, context=s.context)
        rationale = render_rationale_qa(self.rationale_prompt, entity=sample.title, summary=summary, caption=sample.caption, context=s.context)
        counter("estimate_samples").inc()
        # What is sent: the text around the image marker, without the marker.
        counter("estimate_verify_text_tokens").inc(text_tokens("".join(split_image(verify))))
        counter("estimate_rationale_text_tokens").inc(text_tokens("".join(split_image(rationale))))
        if self.rew_prompt is not None:
            rew = render_verify(self.rew_prompt, caption=sample.caption, title=sample.title, summary=summary, mode=s.mode,
                                context=s.context)
            counter("estimate_rew_text_tokens").inc(text_tokens("".join(split_image(rew))))
        width, height = sample.width or 0, sample.height or 0
        if width <= 0 or height <= 0:
            counter("estimate_images_without_size").inc()
        counter("estimate_images").inc()
        counter("estimate_image_tokens").inc(self._tokens_at(width, height, s.max_image_side))
        for side in self.sides:
            counter(f"estimate_image_tokens_at_{side}").inc(self._tokens_at(width, height, side))
        return ()

    def _tokens_at(self, width: int, height: int, side: int) -> int:
        """The image's tokens after refine's downscale to `side` (an unknown size: a square of it)."""
        if width <= 0 or height <= 0:
            width = height = side or DEFAULT_LLM_MAX_SIDE
        elif side > 0 and max(width, height) > side:
            scale = side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        return image_tokens(width, height, self.rule)
