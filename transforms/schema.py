"""Typed records that cross stage boundaries, and the one place their file schemas come from.

Every record is a dataclass whose fields carry their Arrow type in the field metadata.
`arrow_schema(Record)` derives the Parquet schema from it, `to_row` / `from_row` convert to
and from the plain dicts that `beam.io.WriteToParquet` and pyarrow want. Later stages
(shard writers, TFRecord feature specs) derive their layouts from the same declarations, so
a column is declared once.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import pyarrow as pa


def _f(arrow_type: pa.DataType, default: Any = dataclasses.MISSING, doc: str = "", tf: str = ""):
    """A field with its Arrow type, a doc string and (for shard records) its TFRecord
    feature name."""
    kwargs = {"metadata": {"arrow": arrow_type, "doc": doc, "tf": tf}}
    if default is not dataclasses.MISSING:
        if isinstance(default, (dict, list)):
            kwargs["default_factory"] = lambda d=default: type(d)(d)
        else:
            kwargs["default"] = default
    return dataclasses.field(**kwargs)


@dataclasses.dataclass
class Entity:
    """One catalog entity (OVEN Wiki6M row)."""

    qid: str = _f(pa.string(), doc="Wikidata id, e.g. Q243")
    title: str = _f(pa.string(), doc="Wikipedia title")
    int_id: int = _f(pa.int64(), -1, doc="dense id in catalog file order, -1 until assigned")
    summary: Optional[str] = _f(pa.string(), None, doc="wikipedia_summary when present")
    # Position of the first occurrence: (file index in sorted file list, row in that file).
    # Int ids are the dense rank of this position, so they follow file order.
    file_index: int = _f(pa.int32(), 0)
    row: int = _f(pa.int64(), 0)
    extra_json: Optional[str] = _f(pa.string(), None, doc="every other catalog field, JSON")


@dataclasses.dataclass
class Caption:
    """One caption row of an image-text corpus (LAION parquet, webdataset, parquet)."""

    key: str = _f(pa.string(), doc="image identity: <file tag>/<corpus key>, or a hash of the URL")
    url: Optional[str] = _f(pa.string(), None)
    caption: str = _f(pa.string(), "")
    source: str = _f(pa.string(), "", doc="file the row came from")
    width: Optional[int] = _f(pa.int32(), None)
    height: Optional[int] = _f(pa.int32(), None)
    meta_json: Optional[str] = _f(pa.string(), None, doc="other corpus columns, JSON")
    image_ref: Optional[str] = _f(
        pa.string(), None, doc="where the image lies in `source` (image corpora): t:<offset>:<size> or p:<rg>:<row>, comma list"
    )


@dataclasses.dataclass
class Candidate:
    """An image selected for an entity by caption retrieval (output of select_candidates)."""

    key: str = _f(pa.string())
    url: Optional[str] = _f(pa.string(), None)
    caption: str = _f(pa.string(), "")
    qid: str = _f(pa.string(), "")
    title: str = _f(pa.string(), "")
    score: float = _f(pa.float32(), 0.0, doc="cosine(caption, entity title)")
    rank: int = _f(pa.int32(), 0, doc="1 = best kept caption of this entity")
    retrieval_rank: int = _f(pa.int32(), 0, doc="rank in the entity's top-K before dedup")
    entity_id: int = _f(pa.int64(), -1, doc="int_id in the entity index")
    source: str = _f(pa.string(), "")
    width: Optional[int] = _f(pa.int32(), None)
    height: Optional[int] = _f(pa.int32(), None)
    meta_json: Optional[str] = _f(pa.string(), None)
    image: Optional[bytes] = _f(pa.binary(), None, doc="encoded image bytes (image corpora)")
    image_ref: Optional[str] = _f(pa.string(), None, doc="the caption's image locations (internal, not written)")


@dataclasses.dataclass
class Sample:
    """One training example as written to the shards (Parquet, TFRecord, webdataset).

    Everything select_candidates knew about the image, the decoded image facts, and the
    decontamination result. `tf` names the tf.train.Example feature of each field.
    """

    key: str = _f(pa.string(), doc="image identity (corpus key or URL hash)", tf="image/key")
    image: bytes = _f(pa.binary(), b"", doc="encoded image, as downloaded", tf="image/encoded")
    image_format: str = _f(pa.string(), "", doc="jpg|png|webp|gif|bmp|tif, from the content", tf="image/format")
    width: Optional[int] = _f(pa.int32(), None, doc="decoded width (EXIF orientation applied)", tf="image/width")
    height: Optional[int] = _f(pa.int32(), None, doc="decoded height", tf="image/height")
    image_sha256: str = _f(pa.string(), "", doc="sha256 of the image bytes, hex", tf="image/sha256")
    url: Optional[str] = _f(pa.string(), None, doc="source URL", tf="image/url")
    caption: str = _f(pa.string(), "", doc="original web caption", tf="image/caption")
    qid: str = _f(pa.string(), "", doc="Wikidata id of the entity (the label)", tf="entity/qid")
    title: str = _f(pa.string(), "", doc="Wikipedia title of the entity", tf="entity/title")
    entity_id: int = _f(pa.int64(), -1, doc="int id in the entity index", tf="entity/id")
    score: float = _f(pa.float32(), 0.0, doc="cosine(caption, title)", tf="retrieval/score")
    rank: int = _f(pa.int32(), 0, doc="1 = best caption of the entity", tf="retrieval/rank")
    retrieval_rank: int = _f(pa.int32(), 0, doc="rank in the top-K before one-image-one-entity", tf="retrieval/retrieval_rank")
    max_eval_similarity: Optional[float] = _f(
        pa.float32(), None, doc="max CLIP cosine with any evaluation image", tf="decontam/max_similarity"
    )
    nearest_eval_id: Optional[str] = _f(pa.string(), None, doc="the evaluation image of that similarity", tf="decontam/nearest_eval_id")
    source: str = _f(pa.string(), "", doc="file the sample came from", tf="source/path")
    meta_json: Optional[str] = _f(pa.string(), None, doc="kept corpus columns, JSON", tf="source/meta_json")
    # REW fields (pipelines.refine); None in shards written before refinement.
    candidate_qid: Optional[str] = _f(pa.string(), None, doc="entity proposed by caption retrieval", tf="rew/candidate_qid")
    candidate_title: Optional[str] = _f(pa.string(), None, tf="rew/candidate_title")
    verdict: Optional[str] = _f(pa.string(), None, doc="correct | corrected (qid/title are the final entity)", tf="rew/verdict")
    changed: Optional[bool] = _f(pa.bool_(), None, doc="final qid != candidate qid", tf="rew/changed")
    llm_entity: Optional[str] = _f(pa.string(), None, doc="entity name as the LLM wrote it", tf="rew/llm_entity")
    verify_reason: Optional[str] = _f(pa.string(), None, tf="rew/verify_reason")
    grounding_method: Optional[str] = _f(pa.string(), None, doc="verified | exact | normalized | disambiguation | embedding", tf="rew/grounding_method")
    grounding_score: Optional[float] = _f(pa.float32(), None, tf="rew/grounding_score")
    ambiguous_qids: Optional[str] = _f(pa.string(), None, doc="other QIDs with the same title, JSON list", tf="rew/ambiguous_qids")
    rationale: Optional[str] = _f(pa.string(), None, doc="1-3 sentences grounded in what is visible", tf="rew/rationale")
    qa_json: Optional[str] = _f(pa.string(), None, doc='[{"question", "answer"}, ...] as JSON', tf="rew/qa_json")
    summary_missing: Optional[bool] = _f(pa.bool_(), None, doc="the entity had no Wikipedia summary in the prompt", tf="rew/summary_missing")
    llm_model: Optional[str] = _f(pa.string(), None, tf="rew/llm_model")
    verify_prompt: Optional[str] = _f(pa.string(), None, doc="prompt id@sha256", tf="rew/verify_prompt")
    rationale_prompt: Optional[str] = _f(pa.string(), None, doc="prompt id@sha256", tf="rew/rationale_prompt")
    escalated: Optional[bool] = _f(pa.bool_(), None, doc="decided by the escalation model (refine --escalate_backend)", tf="rew/escalated")
    first_verdict: Optional[str] = _f(
        pa.string(), None, doc="the first model's verdict when escalated (invalid: its answer failed the schema)", tf="rew/first_verdict"
    )
    verdict_prob: Optional[float] = _f(
        pa.float32(), None, doc="probability of the first model's verdict, from its logprobs (when asked)", tf="rew/verdict_prob"
    )


# Every reject stage of the project (what `rejected/<stage>/` folders are called), so a
# counter `rejected_<stage>_<reason>` can be split back into its stage and reason.
KNOWN_STAGES = (
    "read_catalog", "dedup", "embed", "read_captions", "search", "select", "read_candidates", "decode",
    "decontaminate", "eval_images", "read_samples", "verify", "ground", "rationale_qa", "read_oven", "images", "other",
)


@dataclasses.dataclass
class Reject:
    """A record that did not make it, and why. Written to rejected/<stage>/."""

    stage: str = _f(pa.string())
    reason: str = _f(pa.string())
    detail: str = _f(pa.string(), "")
    key: Optional[str] = _f(pa.string(), None)
    source: Optional[str] = _f(pa.string(), None)
    record_json: Optional[str] = _f(pa.string(), None, doc="the offending record, truncated")
    count: int = _f(pa.int64(), 1, doc="records this reject stands for (a whole file: its rows)")
    thumbnail: Optional[str] = _f(pa.string(), None, doc="data: URL of a small JPEG of the rejected image, where kept")

    def to_json(self) -> str:
        row = to_row(self)
        if row.get("thumbnail") is None:
            row.pop("thumbnail", None)  # most rejects have none: their lines stay as they were
        return json.dumps(row, ensure_ascii=False, sort_keys=True)

    @classmethod
    def of(cls, stage, reason, detail, key=None, source=None, record=None, count=1) -> Reject:
        """A reject whose offending record (any JSON-able value or None) is stored truncated."""
        return cls(
            stage=stage,
            reason=reason,
            detail=detail,
            key=key,
            source=source,
            record_json=None if record is None else truncate_json(record),
            count=count,
        )


def arrow_schema(cls, exclude: tuple[str, ...] = ()) -> pa.Schema:
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        fields.append(pa.field(f.name, f.metadata["arrow"], metadata={"doc": f.metadata["doc"]}))
    return pa.schema(fields)


def tf_feature_names(cls) -> dict[str, str]:
    """field name -> tf.train.Example feature name, for records that declare them."""
    return {f.name: f.metadata["tf"] for f in dataclasses.fields(cls) if f.metadata.get("tf")}


def column_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def to_row(record, exclude: tuple[str, ...] = ()) -> dict:
    return {
        f.name: getattr(record, f.name)
        for f in dataclasses.fields(record)
        if f.name not in exclude
    }


def from_row(cls, row: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in row.items() if k in names})


def truncate_json(obj: Any, limit: int = 2000) -> str:
    """JSON of a record for a reject file: bytes summarised, long strings cut, always valid JSON."""

    def clean(v):
        if isinstance(v, (bytes, bytearray, memoryview)):
            return f"<{len(v)} bytes>"
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, str):
            return v if len(v) <= field_limit else v[:field_limit] + f"...<{len(v)} chars>"
        if isinstance(v, (int, float, bool)) or v is None:
            return v
        return repr(v)[:field_limit]

    field_limit = max(50, limit // 4)
    text = json.dumps(clean(obj), ensure_ascii=False, default=repr)
    if len(text) > limit:
        # Still valid JSON: keep the shape, summarise the content.
        text = json.dumps({"truncated": True, "chars": len(text), "head": text[: limit // 2]})
    return text
