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
import hashlib
import heapq
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from transforms.formats.keys import REF_SEP, merge_refs, source_file
from transforms.formats.shards import read_images_at
from transforms.io.readers import REJECTED
from transforms.io.retry import retry_call
from transforms.io.writers import DeadLetters
from transforms.run.progress import counter
from transforms.run.shuffles import MeasureShuffle
from transforms.schema import Candidate, Caption, Reject, truncate_json


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
        if old is not None and old[1].image_ref != caption.image_ref:
            # One key, several locations: keep them all, so the image pass can check that
            # they hold the same image.
            refs = merge_refs(old[1].image_ref, caption.image_ref)
            if (-score, caption.caption) < (-old[0], old[1].caption):
                acc[caption.key] = (score, dataclasses.replace(caption, image_ref=refs))
            else:
                acc[caption.key] = (old[0], dataclasses.replace(old[1], image_ref=refs))
            return
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
        self.searched = counter("captions_searched")
        self.proposing = counter("captions_proposing")
        self.below = counter("captions_below_min_score")
        self.proposals = counter("proposals")

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
    counter("proposals_in_top_k").inc(len(top))
    for rank, (score, caption) in enumerate(top, start=1):
        yield caption.key, Assignment(entity_id, score, rank, caption)


class KeepBestEntity(beam.DoFn):
    """image key -> its best Assignment; the others become rejects that name the winner."""

    STAGE = "select"

    def __init__(self):
        self.kept = counter("images_kept")
        self.lost = counter("proposals_lost_to_other_entity")

    def process(self, element):
        key, assignments = element
        ordered = sorted(assignments, key=_entity_preference)
        best = ordered[0]
        refs = best.caption.image_ref
        for a in ordered[1:]:
            refs = merge_refs(refs, a.caption.image_ref)
        if refs != best.caption.image_ref:
            best = best._replace(caption=dataclasses.replace(best.caption, image_ref=refs))
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
            counter("entities_missing_from_table").inc()
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
                image_ref=c.image_ref,
            )


class SelectFromSearchResults(beam.PTransform):
    """(Caption, PredictionResult with (ids, scores)) -> Candidate, plus rejects.

    `entities` is a PCollection of (int_id, (qid, title)).
    Returns a dict with "candidates" and "rejected".
    """

    def __init__(self, entities, k: int, per_caption_entities: int, min_score: float, hot_key_fanout: int = 0):
        super().__init__()
        self.entities = entities
        self.k = k
        self.m = per_caption_entities
        self.min_score = min_score
        self.hot_key_fanout = hot_key_fanout

    def expand(self, searched):
        top_k_combine = beam.CombinePerKey(TopKDistinctImages(self.k))
        if self.hot_key_fanout > 1:
            # Generic titles draw a large share of all proposals: pre-combine every key on
            # `hot_key_fanout` workers before the final merge.
            top_k_combine = top_k_combine.with_hot_key_fanout(self.hot_key_fanout)
        top_k = (
            searched
            | "Propose" >> beam.ParDo(ProposeEntities(self.m, self.min_score))
            | "MeasureTopK" >> MeasureShuffle("top_k_per_entity")
            | "TopKPerEntity" >> top_k_combine
            | "RankTopK" >> beam.FlatMap(_rank_top_k)
        )
        best = (
            top_k
            | "MeasureByImage" >> MeasureShuffle("one_entity_per_image")
            | "GroupByImage" >> beam.GroupByKey()
            | "OneEntityPerImage"
            >> beam.ParDo(KeepBestEntity()).with_outputs(REJECTED, main="kept")
        )
        candidates = (
            {
                "entity": self.entities | "MeasureEntityTable" >> MeasureShuffle("join_entity_table"),
                "kept": best.kept | "MeasureKept" >> MeasureShuffle("join_entity_table"),
            }
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
    """Give each selected candidate of an image corpus its image bytes, read back from its
    source file: candidates are grouped by file, and each file is opened once to read only
    the selected images (ranged reads in a tar, the image column of the needed row groups
    in a Parquet file). Only the selected candidates cross the shuffle, never the corpus.

    A key whose locations hold different images is a `key_collision` reject; a location
    with no image is `image_missing`. I/O errors are raised, so the runner retries.
    """

    def __init__(self, image_col: Optional[str]):
        super().__init__()
        self.image_col = image_col

    def expand(self, candidates):
        return (
            candidates
            | "ByFile" >> beam.Map(lambda c: (source_file(c.source), c))
            | "MeasureByFile" >> MeasureShuffle("attach_images")
            | "GroupByFile" >> beam.GroupByKey()
            | "ReadSelected" >> beam.ParDo(ReadSelectedImages(self.image_col)).with_outputs(REJECTED, main="candidates")
        )


class ReadSelectedImages(beam.DoFn):
    """(file, [Candidate]) -> Candidate with `image`, or a reject."""

    STAGE = "select"

    def __init__(self, image_col: Optional[str]):
        self.image_col = image_col
        self.attached = counter("candidates_with_image")

    def _reject(self, c: Candidate, reason: str, detail: str):
        return beam.pvalue.TaggedOutput(
            REJECTED,
            Reject.of(self.STAGE, reason, detail, c.key, c.source, {**dataclasses.asdict(c), "image": None}),
        )

    def process(self, element):
        path, cands = element
        cands = sorted(cands, key=lambda c: (c.key, c.qid))
        wanted = sorted({loc for c in cands for loc in (c.image_ref or "").split(REF_SEP) if loc})
        images, missing = retry_call(lambda: read_images_at(path, wanted, self.image_col), path)
        for c in cands:
            locs = [loc for loc in (c.image_ref or "").split(REF_SEP) if loc]
            if not locs:
                yield self._reject(c, "image_missing", "selected by caption but its sample has no image")
                continue
            gone = [loc for loc in locs if loc not in images]
            if gone:
                why = "; ".join(f"{loc}: {missing.get(loc, 'no image')}" for loc in gone)
                yield self._reject(c, "image_missing", f"no image bytes at {why}")
                continue
            distinct = {hashlib.sha256(images[loc]).hexdigest() for loc in locs}
            if len(distinct) > 1:
                yield self._reject(
                    c,
                    "key_collision",
                    f"key {c.key!r} names {len(distinct)} different images in {path} "
                    f"(at {', '.join(locs)}); neither is kept: give the corpus unique keys",
                )
                continue
            self.attached.inc()
            yield dataclasses.replace(c, image=images[locs[0]], image_ref=None)
