"""Turn OVEN annotations + images into training shards (for fine-tuning with OVEN questions).

    python -m pipelines.oven_to_shards --oven oven_entity_train.jsonl --images oven_images/ \\
        --output out/oven_train [--entities wiki6m.jsonl] [--splits entity_train,query_train] \\
        [--formats parquet,tfrecord,webdataset]

GER fine-tunes on OVEN's training split with OVEN's own questions. This writes each
annotation as a `Sample` in the project's shard formats, so `trainer.train --stage
finetune` reads it like any other shard: `key` = data_id, `qid` = entity_id, `title` =
entity_text (or the catalog title with --entities), the image bytes, and `meta_json` with
`question`, `data_split`, `image_id`, `data_id` (the trainer asks the record's question).
Images are `IMAGE_ID.<ext>` under --images, flat or one level of sub-folders, local or
gs://. A line that is not an OVEN annotation, an image that is missing or does not decode,
and a split outside --splits end in rejected/<stage>/ with the reason; the counts add up
(`count_check` in manifest.json).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.io import fileio

from transforms.errors import UsageError
from transforms.formats import safe_json
from transforms.formats.files import match_files, read_bytes
from transforms.formats.media import IMAGE_SUFFIXES
from transforms.io.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, ImageError, decode_image
from transforms.io.readers import REJECTED, ReadCatalogFile
from transforms.io.retry import retry_call
from transforms.io.writers import SHARD_FORMATS, WriteRejects, WriteShards, parse_formats
from transforms.run.job import build_only, is_dry_run, run_and_count
from transforms.run.manifest import RecordWritten, finish_run, prepare_output, written_gaps
from transforms.run.options import cli_main, new_parser, parse
from transforms.run.progress import counter as progress_counter
from transforms.run.shuffles import MeasureShuffle
from transforms.schema import Reject, Sample

STAGES = ["read_oven", "images", "read_catalog"]


def _counter(name: str):
    return progress_counter(name)


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.oven_to_shards")
    p.add_argument("--oven", required=True, help="OVEN annotation JSON lines (glob or comma list)")
    p.add_argument("--images", required=True, help="folder of IMAGE_ID.<ext>, flat or one level of sub-folders")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--entities", default=None, help="catalog: titles from it instead of entity_text")
    p.add_argument("--splits", default="", help="keep only these data_split values (comma list; default all)")
    p.add_argument("--formats", default="parquet", help=f"comma list of {', '.join(SHARD_FORMATS)}")
    p.add_argument("--num_shards", type=int, default=0, help="output shards; 0 = runner decides (no shuffle)")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    p.add_argument("--max_image_bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="memory one image's decode may take (pixels x bytes per pixel of its mode and conversion); larger images are rejected (too_many_bytes)")
    return p


class ParseAnnotation(beam.DoFn):
    def __init__(self, splits: frozenset):
        self.splits = splits

    def process(self, element):
        path, line = element
        if not line.strip():
            return
        _counter("annotations_read").inc()
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


def _image_entry(metadata):
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
            _counter("samples_built").inc()
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


def check_counts(counters: dict, formats=("parquet",)) -> list[str]:
    read = counters.get("annotations_read", 0)
    built = counters.get("samples_built", 0)
    rejected = sum(v for k, v in counters.items() if k.startswith(("rejected_read_oven_", "rejected_images_")))
    problems = []
    if read != built + rejected:
        problems.append(f"build_samples: annotations_read {read} != samples_built {built} + rejected {rejected}")
    return problems + written_gaps(counters, "write_shards", built, "samples", formats)


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    args, options = parse(build_parser(), argv)
    formats = parse_formats(args.formats)
    oven_files = match_files(args.oven, "--oven")
    root = args.images.rstrip("/")
    if not root.startswith("gs://") and not os.path.isdir(root):
        raise UsageError(f"--images {args.images!r}: no such folder")
    splits = frozenset(s for s in args.splits.split(",") if s)
    out = args.output.rstrip("/")
    p = test_pipeline or beam.Pipeline(options=options)
    parsed = (
        p
        | "OvenFiles" >> beam.Create(oven_files)
        | "ReadOven" >> beam.io.ReadAllFromText(with_filename=True)
        | "Parse" >> beam.ParDo(ParseAnnotation(splits)).with_outputs(REJECTED, main="annotations")
    )
    images = (
        p
        | "ImageGlobs" >> beam.Create([f"{root}/*", f"{root}/*/*"])
        | "MatchImages" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
        | "ImageIds" >> beam.FlatMap(_image_entry)
    )
    titles = {}
    rejects = [parsed[REJECTED]]
    if args.entities:
        catalog = (
            p
            | "CatalogFiles" >> beam.Create(list(enumerate(match_files(args.entities, "--entities"))))
            | "ReadCatalog" >> beam.ParDo(ReadCatalogFile()).with_outputs(REJECTED, main="entities")
        )
        # First title per QID (a catalog may repeat a QID); held in memory on each worker.
        titles = beam.pvalue.AsDict(
            catalog.entities
            | "TitleOf" >> beam.Map(lambda e: (e.qid, e.title))
            | "MeasureTitles" >> MeasureShuffle("one_title_per_qid")
            | "OnePerQid" >> beam.CombinePerKey(lambda ts: min(ts) if ts else "")
        )
        rejects.append(catalog[REJECTED])
    else:
        titles = beam.pvalue.AsDict(p | "NoTitles" >> beam.Create([]))
    built = (
        {
            "ann": parsed.annotations | "MeasureAnn" >> MeasureShuffle("join_images"),
            "path": images | "MeasurePaths" >> MeasureShuffle("join_images"),
        }
        | "JoinImages" >> beam.CoGroupByKey()
        | "Build" >> beam.ParDo(BuildSamples(args.max_pixels, args.max_image_bytes), titles).with_outputs(REJECTED, main="samples")
    )
    rejects.append(built[REJECTED])
    _ = (
        built.samples
        | "Shards" >> WriteShards(out, "samples", formats, args.num_shards)
        | "RecordWritten" >> RecordWritten(out, "samples")
    )
    _ = tuple(rejects) | "Rejects" >> WriteRejects(out, STAGES)
    if is_dry_run(options):
        return build_only(p, "oven_to_shards")
    prepare_output(out, ("samples",))
    started = dt.datetime.now(dt.UTC)
    counters, seconds = run_and_count(p, "oven_to_shards")
    return finish_run(
        name="oven_to_shards",
        output=out,
        kind="oven_shards",
        counters=counters,
        seconds=seconds,
        started=started,
        check=lambda c: check_counts(c, formats),
        fields={"inputs": oven_files, "images": args.images, "formats": list(formats), "options": vars(args)},
        lines=(f"shards: {out}/samples-*   rejects: {out}/rejected/   manifest: {out}/manifest.json",),
    )


if __name__ == "__main__":
    cli_main(run)
