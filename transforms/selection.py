"""The kNN join of GER's Entity-LAION recipe as Beam transforms.

Captions are embedded and searched against the entity index; each caption proposes its
top-M entities; each entity keeps its top-K distinct images (a combiner, so memory is
bounded by K per entity); each image then keeps only its best entity; the kept images of
each entity are ranked and joined with the entity table (qid, title), and for image
corpora with their image bytes.

Order is total and deterministic everywhere:
  captions of one image: higher score, then smaller caption text;
  within an entity:     higher score first, then smaller image key;
  among an image's entities: higher score, then better retrieval rank, then smaller int id.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from transforms.common import METRICS_NAMESPACE
from transforms.readers import REJECTED
from transforms.schema import Candidate, Caption, Reject, truncate_json
from transforms.sinks import DeadLetters


def _counter(name: str):
    return Metrics.counter(METRICS_NAMESPACE, name)


class Proposal(NamedTuple):
    """A caption proposing itself to one entity."""

    score: float
    caption: Caption


class Assignment(NamedTuple):
    """An image in an entity's top-K."""

    entity_id: int
    score: float
    retrieval_rank: int
    caption: Caption


def _within_entity_order(score: float, key: str):
    return (-score, key)


def _entity_preference(a: Assignment):
    return (-a.score, a.retrieval_rank, a.entity_id)


class TopKDistinctImages(beam.CombineFn):
    """Per entity: the K best proposals with distinct image keys.

    Accumulator: {key: (score, caption)} holding at most ~2K entries; pruning to the K best
    is exact because a pruned key can only come back with a higher score, which re-adds it.
    """

    def __init__(self, k: int):
        self.k = k

    def create_accumulator(self):
        return {}

    def _add(self, acc: dict, score: float, caption: Caption):
        # Several captions of one image: keep its best; equal scores -> smaller caption text,
        # so the result does not depend on the order bundles arrive in.
        old = acc.get(caption.key)
        if old is None or (-score, caption.caption) < (-old[0], old[1].caption):
            acc[caption.key] = (score, caption)

    def _prune(self, acc: dict) -> dict:
        if len(acc) <= 2 * self.k:
            return acc
        best = heapq.nsmallest(self.k, acc.items(), key=lambda kv: _within_entity_order(kv[1][0], kv[0]))
        return dict(best)

    def add_input(self, acc, proposal: Proposal):
        self._add(acc, proposal.score, proposal.caption)
        return self._prune(acc)

    def merge_accumulators(self, accumulators):
        it = iter(accumulators)
        merged = dict(next(it))
        for acc in it:
            for score, caption in acc.values():
                self._add(merged, score, caption)
            merged = self._prune(merged)
        return merged

    def compact(self, acc):
        return self._prune(acc)

    def extract_output(self, acc) -> list[tuple[float, Caption]]:
        return heapq.nsmallest(
            self.k, acc.values(), key=lambda sc: _within_entity_order(sc[0], sc[1].key)
        )


class ProposeEntities(beam.DoFn):
    """(Caption, PredictionResult(ids, scores)) -> (entity_id, Proposal) for the caption's
    top-M entities scoring at least `min_score`."""

    def __init__(self, per_caption_entities: int, min_score: float):
        self.m = per_caption_entities
        self.min_score = min_score
        self.searched = _counter("captions_searched")
        self.proposing = _counter("captions_proposing")
        self.below = _counter("captions_below_min_score")
        self.proposals = _counter("proposals")

    def process(self, element):
        caption, result = element
        ids, scores = result.inference
        self.searched.inc()
        n = 0
        for eid, score in zip(ids[: self.m], scores[: self.m]):
            score = float(score)
            if eid < 0 or score < self.min_score:
                continue
            n += 1
            yield int(eid), Proposal(score, caption)
        if n:
            self.proposing.inc()
            self.proposals.inc(n)
        else:
            self.below.inc()


def _rank_top_k(element):
    entity_id, top = element
    _counter("proposals_in_top_k").inc(len(top))
    for rank, (score, caption) in enumerate(top, start=1):
        yield caption.key, Assignment(entity_id, score, rank, caption)


class KeepBestEntity(beam.DoFn):
    """image key -> its best Assignment; the others become rejects that name the winner."""

    STAGE = "select"

    def __init__(self):
        self.kept = _counter("images_kept")
        self.lost = _counter("proposals_lost_to_other_entity")

    def process(self, element):
        key, assignments = element
        ordered = sorted(assignments, key=_entity_preference)
        best = ordered[0]
        self.kept.inc()
        yield best.entity_id, best
        for a in ordered[1:]:
            self.lost.inc()
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                Reject(
                    stage=self.STAGE,
                    reason="assigned_to_other_entity",
                    detail=(
                        f"entity {a.entity_id} (score {a.score:.4f}, rank {a.retrieval_rank}) "
                        f"lost to entity {best.entity_id} (score {best.score:.4f}, "
                        f"rank {best.retrieval_rank})"
                    ),
                    key=key,
                    source=a.caption.source,
                    record_json=truncate_json(
                        {"caption": a.caption.caption, "url": a.caption.url}
                    ),
                ),
            )


class RankAndName(beam.DoFn):
    """(entity_id, {"entity": [(qid, title)], "kept": [Assignment]}) -> Candidate rows,
    ranked 1..n by score within the entity."""

    def process(self, element):
        entity_id, joined = element
        kept = list(joined["kept"])
        if not kept:
            return
        names = list(joined["entity"])
        if not names:
            _counter("entities_missing_from_table").inc()
            qid, title = "", ""
        else:
            qid, title = names[0]
        kept.sort(key=lambda a: _within_entity_order(a.score, a.caption.key))
        for rank, a in enumerate(kept, start=1):
            c = a.caption
            yield Candidate(
                key=c.key,
                url=c.url,
                caption=c.caption,
                qid=qid,
                title=title,
                score=float(np.float32(a.score)),
                rank=rank,
                retrieval_rank=a.retrieval_rank,
                entity_id=entity_id,
                source=c.source,
                width=c.width,
                height=c.height,
                meta_json=c.meta_json,
            )


class SelectFromSearchResults(beam.PTransform):
    """(Caption, PredictionResult with (ids, scores)) -> Candidate, plus rejects.

    `entities` is a PCollection of (int_id, (qid, title)).
    Returns a dict with "candidates" and "rejected".
    """

    def __init__(self, entities, k: int, per_caption_entities: int, min_score: float):
        super().__init__()
        self.entities = entities
        self.k = k
        self.m = per_caption_entities
        self.min_score = min_score

    def expand(self, searched):
        top_k = (
            searched
            | "Propose" >> beam.ParDo(ProposeEntities(self.m, self.min_score))
            | "TopKPerEntity" >> beam.CombinePerKey(TopKDistinctImages(self.k))
            | "RankTopK" >> beam.FlatMap(_rank_top_k)
        )
        best = (
            top_k
            | "GroupByImage" >> beam.GroupByKey()
            | "OneEntityPerImage"
            >> beam.ParDo(KeepBestEntity()).with_outputs(REJECTED, main="kept")
        )
        candidates = (
            {"entity": self.entities, "kept": best.kept}
            | "JoinEntityTable" >> beam.CoGroupByKey()
            | "RankAndName" >> beam.ParDo(RankAndName())
        )
        return {"candidates": candidates, "rejected": best[REJECTED]}


def _caption_text(c: Caption):
    return c, c.caption


def _vector_of(element):
    caption, result = element
    return caption, result.inference


class EmbedAndSearch(beam.PTransform):
    """Caption -> (Caption, PredictionResult(vector, (entity ids, scores))).

    Two RunInference steps: the sentence-transformer, then the faiss index. They fuse into
    one stage, so vectors never leave the worker. Failed batches become rejects.
    """

    def __init__(self, text_handler, search_handler):
        super().__init__()
        self.text_handler = text_handler
        self.search_handler = search_handler

    def expand(self, captions):
        embedded, embed_dlq = (
            captions
            | "KeyByCaption" >> beam.Map(_caption_text)
            | "EmbedCaptions"
            >> RunInference(KeyedModelHandler(self.text_handler)).with_exception_handling()
        )
        searched, search_dlq = (
            embedded
            | "VectorOnly" >> beam.Map(_vector_of)
            | "SearchEntityIndex"
            >> RunInference(KeyedModelHandler(self.search_handler)).with_exception_handling()
        )
        rejected = (
            embed_dlq.failed_inferences | "EmbedFailures" >> beam.ParDo(DeadLetters("embed", "embed_failed")),
            search_dlq.failed_inferences
            | "SearchFailures" >> beam.ParDo(DeadLetters("search", "search_failed")),
        ) | "FlattenInferenceRejects" >> beam.Flatten()
        return {"searched": searched, "rejected": rejected}


class AttachImages(beam.PTransform):
    """Join selected candidates with their image bytes by key (images never pass through
    the top-K grouping). A candidate whose image is missing becomes a reject."""

    def __init__(self, images):
        super().__init__()
        self.images = images

    def expand(self, candidates):
        return (
            {
                "cand": candidates | "KeyCandidates" >> beam.Map(lambda c: (c.key, c)),
                "image": self.images,
            }
            | "JoinImages" >> beam.CoGroupByKey()
            | "Attach" >> beam.ParDo(_AttachImage()).with_outputs(REJECTED, main="candidates")
        )


class _AttachImage(beam.DoFn):
    def process(self, element):
        key, joined = element
        cands = list(joined["cand"])
        if not cands:
            return
        images: Iterable[bytes] = joined["image"]
        image: Optional[bytes] = next(iter(images), None)
        for c in cands:
            if image is None:
                yield beam.pvalue.TaggedOutput(
                    REJECTED,
                    Reject(
                        stage="select",
                        reason="image_missing",
                        detail="selected by caption but no image bytes under this key",
                        key=key,
                        source=c.source,
                        record_json=truncate_json(dataclasses.asdict(c)),
                    ),
                )
                continue
            _counter("candidates_with_image").inc()
            yield dataclasses.replace(c, image=bytes(image))
