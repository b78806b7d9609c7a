"""Remove every candidate image that is a near-duplicate of an evaluation image, and write
the training shards.

    python -m pipelines.decontaminate --input 'out/candidates/candidates-*.parquet' \\
        --eval_images oven_val_test.jsonl --eval_image_root oven_images/ --output out/shards

GER's recipe: CLIP ViT-L/14 image embeddings (open_clip, `--clip_pretrained openai`), a
candidate is dropped when its maximum cosine with any evaluation image is strictly greater
than `--threshold` (0.95). Exact search: one matrix product per batch against all evaluation
vectors.

Input (`--input`): select_candidates output for image-bearing corpora (Parquet with an
`image` column), or img2dataset webdataset / parquet shards downloaded from its caption-only
output (qid, title, ... saved with --save_additional_columns).
Evaluation side (`--eval_images`): a folder of images, a glob, or OVEN annotation JSON lines
plus `--eval_image_root` (images as IMAGE_ID.<ext>, flat or in sub-folders).
Output: samples-SSSSS-of-NNNNN.{parquet,tfrecord,tar} (`--formats`), rejected/<stage>/
(bad images with their reason; near-duplicates with the matched eval image id and the
similarity), manifest.json.

Runtime on CPU: ViT-L-14 embeds ~1 image/s per core, ViT-B-32 ~15; use GPU workers
(`--device cuda`) for real corpora.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from transforms.accounting import MeasureShuffle, finish_run, input_summary
from transforms.clip import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    OpenClipImageHandler,
    validate_clip_args,
)
from transforms.common import (
    METRICS_NAMESPACE,
    UsageError,
    build_only,
    is_dry_run,
    match_files,
    run_and_count,
    sum_counters,
    threads_per_process,
)
from transforms.decontam import (
    DecodeImages,
    DropNearDuplicates,
    ReadCandidateImages,
    ReadEvalImage,
    StackEval,
    list_eval_images,
)
from transforms.images import DEFAULT_MAX_PIXELS
from transforms.options import cli_main, new_parser, parse, positive
from transforms.readers import REJECTED, ListFiles, SplitParquet, input_root
from transforms.shards import SHARD_FORMATS, WriteShards, parse_formats
from transforms.sinks import DeadLetters, WriteRejects

log = logging.getLogger(__name__)

STAGES = ["read_candidates", "decode", "eval_images", "embed", "decontaminate"]
SHARD_NAME = "samples"


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="candidate shards: Parquet (image column) and/or webdataset .tar")
    p.add_argument("--eval_images", required=True, help="folder / glob of images, or OVEN annotation JSON lines")
    p.add_argument("--eval_image_root", default=None, help="image folder for an annotation file")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--threshold", type=float, default=0.95, help="drop when max cosine > threshold")
    p.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="open_clip architecture")
    p.add_argument(
        "--clip_pretrained",
        default=DEFAULT_CLIP_PRETRAINED,
        help="open_clip pretrained tag, a local checkpoint path, or 'none' (random weights, tests only)",
    )
    p.add_argument("--formats", default=",".join(SHARD_FORMATS), help=f"comma list of {SHARD_FORMATS}")
    p.add_argument("--batch_size", type=int, default=32, help="images per CLIP call")
    p.add_argument("--device", default="cpu", help="torch device of the CLIP model")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = cores / processes")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    p.add_argument("--num_shards", type=int, default=0, help="output shards; 0 = runner decides")
    return p


def _with_image(item):
    cand_or_id, decoded = item
    # The decoded pixels are needed only for the embedding; keep the facts, drop the pixels.
    return (cand_or_id, dataclasses.replace(decoded, image=None)), decoded.image


def _vector(kv):
    return kv[0], kv[1].inference


def _eval_vector(kv):
    (eval_id, _facts), vec = kv[0], kv[1].inference
    return eval_id, vec


def _count_eval(kv):
    Metrics.counter(METRICS_NAMESPACE, "eval_images_embedded").inc()
    return kv


def _count_written(sample):
    Metrics.counter(METRICS_NAMESPACE, "samples_written").inc()
    return sample


def build_pipeline(p, args, inputs, eval_items, eval_rejects, formats, threads):
    def handler():
        return OpenClipImageHandler(
            args.clip_model, args.clip_pretrained, batch_size=args.batch_size, device=args.device, threads=threads
        )

    # Evaluation side: embedded first; its vectors reach the filter as one side input.
    eval_read = (
        p
        | "EvalImages" >> beam.Create(eval_items)
        | "MeasureSpreadEval" >> MeasureShuffle("spread_eval")
        | "SpreadEval" >> beam.Reshuffle()
        | "ReadEval" >> beam.ParDo(ReadEvalImage()).with_outputs(REJECTED, main="images")
    )
    eval_decoded = eval_read.images | "DecodeEval" >> beam.ParDo(
        DecodeImages("eval_images", args.max_pixels)
    ).with_outputs(REJECTED, main="images")
    eval_embedded, eval_dlq = (
        eval_decoded.images
        | "EvalPixels" >> beam.Map(_with_image)
        | "EmbedEval" >> RunInference(KeyedModelHandler(handler())).with_exception_handling()
    )
    eval_matrix = (
        eval_embedded
        | "EvalVectors" >> beam.Map(_eval_vector)
        | "CountEval" >> beam.Map(_count_eval)
        | "MeasureStackEval" >> MeasureShuffle("stack_eval")
        | "StackEval" >> beam.CombineGlobally(StackEval())
    )

    # Candidates: read, decode, embed, filter, write -- streamed, never all in memory.
    units = []
    rejects = [eval_read[REJECTED], eval_decoded[REJECTED]]
    if eval_rejects:
        rejects.append(p | "EvalListRejects" >> beam.Create(eval_rejects))
    # Files are matched inside the job (a list of 100k shards would be pickled into it).
    files = p | "InputFiles" >> ListFiles(args.input)
    if any(not f.lower().endswith(".tar") for f in inputs):
        split = (
            files
            | "ParquetOnly" >> beam.Filter(lambda f: not f.lower().endswith(".tar"))
            | "SplitRowGroups" >> beam.ParDo(SplitParquet()).with_outputs(REJECTED, main="units")
        )
        units.append(split.units)
        rejects.append(split[REJECTED])
    if any(f.lower().endswith(".tar") for f in inputs):
        units.append(files | "TarsOnly" >> beam.Filter(lambda f: f.lower().endswith(".tar")))
    read = (
        tuple(units)
        | "AllUnits" >> beam.Flatten()
        | "MeasureSpread" >> MeasureShuffle("spread_units")
        | "SpreadUnits" >> beam.Reshuffle()
        | "ReadCandidates" >> beam.ParDo(ReadCandidateImages(input_root(args.input))).with_outputs(REJECTED, main="candidates")
    )
    decoded = read.candidates | "Decode" >> beam.ParDo(DecodeImages("decode", args.max_pixels)).with_outputs(
        REJECTED, main="images"
    )
    embedded, cand_dlq = (
        decoded.images
        | "Pixels" >> beam.Map(_with_image)
        | "EmbedCandidates" >> RunInference(KeyedModelHandler(handler())).with_exception_handling()
    )
    filtered = (
        embedded
        | "Vectors" >> beam.Map(_vector)
        | "Batch" >> beam.BatchElements(min_batch_size=256, max_batch_size=256)
        | "DropNearDuplicates"
        >> beam.ParDo(DropNearDuplicates(args.threshold), beam.pvalue.AsSingleton(eval_matrix)).with_outputs(
            REJECTED, main="samples"
        )
    )
    _ = (
        filtered.samples
        | "CountWritten" >> beam.Map(_count_written)
        | "WriteShards" >> WriteShards(args.output, SHARD_NAME, formats, num_shards=args.num_shards)
    )
    rejects += [
        read[REJECTED],
        decoded[REJECTED],
        filtered[REJECTED],
        eval_dlq.failed_inferences | "EvalEmbedFailures" >> beam.ParDo(DeadLetters("eval_images", "embed_failed")),
        cand_dlq.failed_inferences | "EmbedFailures" >> beam.ParDo(DeadLetters("embed", "embed_failed")),
    ]
    _ = tuple(rejects) | "WriteRejects" >> WriteRejects(args.output, STAGES)


def check_counts(c: dict) -> list[str]:
    g = c.get
    problems = []
    read = g("candidates_read", 0)
    bad_read = sum_counters(c, "rejected_read_candidates_")
    bad_image = sum_counters(c, "rejected_decode_")
    if read != bad_read + bad_image + g("decode_decoded", 0):
        problems.append(f"read {read} != rejected at read {bad_read} + bad images {bad_image} + decoded {g('decode_decoded', 0)}")
    filtered = g("decontaminate_kept", 0) + g("decontaminate_dropped", 0)
    if g("decode_decoded", 0) != filtered + g("rejected_embed_embed_failed", 0):
        problems.append("decoded != kept + dropped + embedding failures")
    if g("decontaminate_dropped", 0) != g("rejected_decontaminate_near_duplicate_of_eval", 0):
        problems.append("dropped != near-duplicate rejects")
    if g("decontaminate_kept", 0) != g("samples_written", 0):
        problems.append("kept != samples written")
    return problems


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    args, options = parse(build_parser(), argv)
    positive("--batch_size", args.batch_size)
    positive("--max_pixels", args.max_pixels)
    if not -1.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine in [-1, 1], got {args.threshold}")
    formats = parse_formats(args.formats)
    validate_clip_args(args.clip_model, args.clip_pretrained)
    inputs = match_files(args.input, "--input")
    eval_items, eval_rejects = list_eval_images(args.eval_images, args.eval_image_root)
    if not eval_items:
        raise UsageError(f"--eval_images: none of the evaluation images in {args.eval_images!r} was found")
    threads = threads_per_process(options, args.threads)
    p = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(p, args, inputs, eval_items, eval_rejects, formats, threads)
    if is_dry_run(options):
        return build_only(p, "decontaminate")
    started = dt.datetime.now(dt.UTC)
    counters, seconds = run_and_count(p)
    out = args.output.rstrip("/")
    lines = []
    if counters.get("eval_images_embedded", 0) < len(eval_items) or eval_rejects:
        lines.append(
            f"WARNING: only {counters.get('eval_images_embedded', 0)} of {len(eval_items)} evaluation images were "
            f"embedded; candidates were not checked against the others (see {out}/rejected/eval_images/)"
        )
    lines.append(f"shards: {out}/{SHARD_NAME}-*   rejects: {out}/rejected/   manifest: {out}/manifest.json")
    return finish_run(
        name="decontaminate",
        output=out,
        kind="decontaminated_shards",
        counters=counters,
        seconds=seconds,
        started=started,
        check=check_counts,
        fields={
            "inputs": input_summary(args.input, inputs),
            "eval_images": {"listed": len(eval_items), "embedded": counters.get("eval_images_embedded", 0)},
            "threshold": args.threshold,
            "clip": {"model": args.clip_model, "pretrained": args.clip_pretrained},
            "formats": list(formats),
            "shards": f"{SHARD_NAME}-SSSSS-of-NNNNN.{{parquet,tfrecord,tar}}",
            "options": vars(args),
        },
        lines=tuple(lines),
    )


if __name__ == "__main__":
    cli_main(run)
