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

import os
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.io import fileio

from transforms.errors import UsageError
from transforms.formats.files import match_files
from transforms.io.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from transforms.io.readers import REJECTED, ReadCatalogFile
from transforms.io.writers import WriteRejects, WriteShards, parse_formats
from transforms.run.job import run_job
from transforms.run.manifest import RecordWritten, finish_run, written_gaps
from transforms.run.options import add_output, add_shards, cli_main, new_parser, parse
from transforms.run.shuffles import MeasureShuffle
from transforms.stages.oven_to_shards import BuildSamples, ParseAnnotation, image_entry

STAGES = ["read_oven", "images", "read_catalog"]


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.oven_to_shards")
    p.add_argument("--oven", required=True, help="OVEN annotation JSON lines (glob or comma list)")
    p.add_argument("--images", required=True, help="folder of IMAGE_ID.<ext>, flat or one level of sub-folders")
    add_output(p)
    p.add_argument("--entities", default=None, help="catalog: titles from it instead of entity_text")
    p.add_argument("--splits", default="", help="keep only these data_split values (comma list; default all)")
    add_shards(p, formats="parquet")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    p.add_argument("--max_image_bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="memory one image's decode may take (pixels x bytes per pixel of its mode and conversion); larger images are rejected (too_many_bytes)")
    return p


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
        | "ImageIds" >> beam.FlatMap(image_entry)
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
    return run_job(p, options, "oven_to_shards", lambda ran: finish_run(
        **ran.fields(),
        name="oven_to_shards",
        output=out,
        kind="oven_shards",
        check=lambda c: check_counts(c, formats),
        fields={"inputs": oven_files, "images": args.images, "formats": list(formats), "options": vars(args)},
        lines=(f"shards: {out}/samples-*   rejects: {out}/rejected/   manifest: {out}/manifest.json",),
    ), output=out, outputs=("samples",))


if __name__ == "__main__":
    cli_main(run)
