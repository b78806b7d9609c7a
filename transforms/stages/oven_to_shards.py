"""The Beam pieces of `oven_to_shards`: OVEN annotation lines parsed (a bad line or an
unselected split is a reject), image files listed by id, and one `Sample` built per
annotation from its decoded image."""

from __future__ import annotations

import hashlib
import json
import os

import apache_beam as beam

from transforms.formats import safe_json
from transforms.formats.files import read_bytes
from transforms.formats.media import IMAGE_SUFFIXES
from transforms.io.images import DEFAULT_MAX_IMAGE_BYTES, ImageError, decode_image
from transforms.io.readers import REJECTED
from transforms.io.retry import retry_call
from transforms.run.progress import counter
from transforms.schema import Reject, Sample


class ParseAnnotation(beam.DoFn):
    def __init__(self, splits: frozenset):
        self.splits = splits

    def process(self, element):
        path, line = element
        if not line.strip():
            return
        counter("annotations_read").inc()
        try:
            obj = safe_json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("data_id", "image_id", "entity_id") if not obj.get(k)]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except ValueError as e:
            yield beam.pvalue.TaggedOutput(REJECTED, Reject.of("read_oven", "bad_annotation", str(e)[:300], source=path, record=line[:1000]))
            return
        if self.splits and obj.get("data_split") not in self.splits:
            yield beam.pvalue.TaggedOutput(
                REJECTED, Reject.of("read_oven", "split_not_selected", str(obj.get("data_split")), key=str(obj["data_id"]), source=path)
            )
            return
        yield str(obj["image_id"]), obj


def image_entry(metadata):
    path = metadata.path
    if not path.lower().endswith(IMAGE_SUFFIXES):
        return
    yield os.path.splitext(os.path.basename(path))[0], path


class BuildSamples(beam.DoFn):
    """(image_id, {"ann": [...], "path": [...]}) -> one Sample per annotation, or rejects."""

    def __init__(self, max_pixels: int, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.max_pixels = max_pixels
        self.max_image_bytes = max_image_bytes

    def process(self, element, titles):
        image_id, joined = element
        anns, paths = joined["ann"], sorted(joined["path"])
        if not anns:
            return  # an image no annotation asks about
        if not paths:
            for a in anns:
                yield beam.pvalue.TaggedOutput(
                    REJECTED, Reject.of("images", "image_missing", f"no {image_id}.<ext> under --images", key=str(a["data_id"]), record=a)
                )
            return
        # An I/O error is retried, then raised (the runner retries the bundle); only what
        # the decoder refuses is a reject.
        data = retry_call(lambda: read_bytes(paths[0]), paths[0])
        try:
            decoded = decode_image(data, self.max_pixels, max_image_bytes=self.max_image_bytes)
        except ImageError as e:
            for a in anns:
                yield beam.pvalue.TaggedOutput(REJECTED, Reject.of("images", e.reason, e.detail, key=str(a["data_id"]), source=paths[0]))
            return
        sha = hashlib.sha256(data).hexdigest()
        for a in anns:
            qid = str(a["entity_id"])
            meta = {k: a.get(k) for k in ("question", "data_split", "image_id", "data_id") if a.get(k) is not None}
            counter("samples_built").inc()
            yield Sample(
                key=str(a["data_id"]),
                image=data,
                image_format=decoded.extension,
                width=decoded.width,
                height=decoded.height,
                image_sha256=sha,
                caption=str(a.get("question") or ""),
                qid=qid,
                title=titles.get(qid) or str(a.get("entity_text") or ""),
                source=paths[0],
                meta_json=json.dumps(meta, ensure_ascii=False, sort_keys=True),
            )
