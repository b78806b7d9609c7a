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

Two phases (two Beam jobs). Phase 1 lists, reads and embeds the evaluation images into
OUTPUT/eval_set/ (embeddings.npy, ids.json, manifest.json, rejected/); it fails closed: if
any evaluation image cannot be read, decoded or embedded, the run stops with an error naming
them before any candidate is read, unless --allow_partial_eval. `--eval_embeddings DIR`
reuses an eval_set/ of an earlier run instead. Phase 2 embeds the candidates and searches
the evaluation matrix (held once per machine when shared across SDK processes).
Output: samples-SSSSS-of-NNNNN.{parquet,tfrecord,tar} (`--formats`), rejected/<stage>/
(bad images with their reason; near-duplicates with the matched eval image id and the
similarity), manifest.json.

Runtime on CPU: ViT-L-14 embeds ~1 image/s per core, ViT-B-32 ~15; use GPU workers
(`--device cuda`) for real corpora.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from transforms.errors import UsageError
from transforms.formats.files import match_files, read_json
from transforms.formats.keys import input_root
from transforms.formats.webdataset import is_tar
from transforms.io.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from transforms.io.readers import REJECTED, ShardUnits
from transforms.io.writers import SHARD_FORMATS, WriteRejects, WriteShards, parse_formats
from transforms.models.clip import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    OpenClipImageHandler,
    clip_input_side,
    validate_clip_args,
)
from transforms.run.job import (
    is_dry_run,
    run_job,
    sum_counters,
    threads_per_process,
    worker_processes,
)
from transforms.run.manifest import (
    RecordWritten,
    check_finished_input,
    finish_run,
    input_summary,
    rows_listed,
    written_gaps,
)
from transforms.run.options import (
    add_output,
    add_shards,
    add_share,
    add_threads,
    add_unfinished_input,
    cli_main,
    new_parser,
    parse,
    positive,
    shared,
)
from transforms.run.shuffles import MeasureShuffle
from transforms.stages.decontaminate import (
    EVAL_IDS_FILE,
    EVAL_SET_DIR,
    EVAL_VECTORS_FILE,
    DropNearDuplicates,
    EmbedImages,
    EvalMatrixHandler,
    ListEvalImages,
    ReadCandidateImages,
    ReadEvalImage,
    StackEval,
    WriteEvalSet,
    WriteEvalThumbnails,
    eval_vector,
    is_annotation_file,
)

log = logging.getLogger(__name__)

STAGES = ["read_candidates", "decode", "embed", "decontaminate"]
EVAL_STAGES = ["eval_images"]
SHARD_NAME = "samples"


class EvalCoverageError(UsageError):
    """Some evaluation images could not be checked: the run stops before any shard is
    written (fail closed) unless --allow_partial_eval says otherwise."""


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.decontaminate")
    p.add_argument("--input", required=True, help="candidate shards: Parquet (image column) and/or webdataset .tar")
    add_unfinished_input(p)
    p.add_argument("--eval_images", default=None, help="folder / glob of images, or OVEN annotation JSON lines")
    p.add_argument("--eval_image_root", default=None, help="image folder for an annotation file")
    p.add_argument(
        "--eval_embeddings",
        default=None,
        help="an eval_set/ folder written by an earlier run (same --clip_model and --clip_pretrained): "
        "reuse its embeddings instead of --eval_images",
    )
    p.add_argument(
        "--allow_partial_eval",
        action="store_true",
        help="write shards even when some evaluation images could not be read, decoded or embedded "
        "(they are listed in eval_set/rejected/ and the manifest says the coverage is partial)",
    )
    add_output(p)
    p.add_argument("--threshold", type=float, default=0.95, help="drop when max cosine > threshold")
    p.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="open_clip architecture")
    p.add_argument(
        "--clip_pretrained",
        default=DEFAULT_CLIP_PRETRAINED,
        help="open_clip pretrained tag, a local checkpoint path, or 'none' (random weights, tests only)",
    )
    p.add_argument("--batch_size", type=int, default=32, help="images per CLIP call")
    p.add_argument("--device", default="cpu", help="torch device of the CLIP model")
    add_threads(p, "torch threads")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    p.add_argument("--max_image_bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="memory one image's decode may take (pixels x bytes per pixel of its mode and conversion); larger images are rejected (too_many_bytes)")
    p.add_argument(
        "--decode_draft",
        choices=("yes", "no"),
        default="yes",
        help="decode each JPEG at the smallest 1/2, 1/4 or 1/8 scale whose shorter side is still at least the "
        "CLIP input side (Pillow's draft mode), on evaluation images and candidates alike: ~1.9x faster host "
        "decode of web photos, a pixel change half that of a re-encoded copy (benchmarks/README.md). An "
        "--eval_embeddings folder must have been made with the same setting",
    )
    add_shards(p, formats=",".join(SHARD_FORMATS), shuffle_note=False)
    add_share(p, "--share_clip", "hold the CLIP model once per machine and send it every SDK process's batches (the images "
              "travel to the holder process)", auto="yes on a GPU (--device cuda) with several SDK processes, else no")
    p.add_argument(
        "--reject_thumbnails", choices=("yes", "no"), default="yes",
        help="keep a <= 128 px JPEG (<= 8 KB) of each dropped image in its reject, and of each evaluation image in "
        "eval_set/thumbnails-*.parquet, so the viewer shows a near-duplicate beside the image it matched",
    )
    add_share(p, "--share_eval", "hold the evaluation matrix once per machine and serve it to every SDK process")
    return p


def decode_side(args) -> int:
    """The draft size JPEGs decode at (0: full size)."""
    if args.decode_draft != "yes":
        return 0
    return clip_input_side(args.clip_model) or 0


def decode_record(args) -> dict:
    return {"draft": args.decode_draft == "yes", "draft_side": decode_side(args)}


def clip_handler(args, threads, share: bool = False):
    return OpenClipImageHandler(
        args.clip_model, args.clip_pretrained, batch_size=args.batch_size, device=args.device, threads=threads,
        share_across_processes=share,
    )


def build_eval_pipeline(p, args, eval_dir: str, threads, share_clip: bool = False):
    """Phase 1: list, read, decode and embed every evaluation image -> eval_set/."""
    items, list_rejects = p | "ListEval" >> ListEvalImages(args.eval_images, args.eval_image_root)
    read = (
        items
        | "MeasureSpreadEval" >> MeasureShuffle("spread_eval")
        | "SpreadEval" >> beam.Reshuffle()
        | "ReadEval" >> beam.ParDo(ReadEvalImage()).with_outputs(REJECTED, main="images")
    )
    embedded = read.images | "EmbedEval" >> EmbedImages(
        "eval_images", "eval_images", clip_handler(args, threads, share_clip), args.max_pixels, decode_side(args),
        args.max_image_bytes,
    )
    _ = (
        embedded["vectors"]
        | "EvalVectors" >> beam.Map(eval_vector)
        | "MeasureStackEval" >> MeasureShuffle("stack_eval")
        | "StackEval" >> beam.CombineGlobally(StackEval())
        | "WriteEvalSet" >> beam.ParDo(WriteEvalSet(eval_dir))
    )
    if args.reject_thumbnails == "yes":
        _ = read.images | "EvalThumbnails" >> WriteEvalThumbnails(eval_dir)
    rejects = (list_rejects, read[REJECTED], embedded["rejected"])
    _ = rejects | "WriteEvalRejects" >> WriteRejects(eval_dir, EVAL_STAGES)


def check_eval_counts(c: dict) -> list[str]:
    listed, embedded = c.get("eval_images_listed", 0), c.get("eval_images_embedded", 0)
    failed = sum_counters(c, "rejected_eval_images_") - c.get("rejected_eval_images_bad_annotation", 0)
    if listed != embedded + failed:
        return [f"eval images listed {listed} != embedded {embedded} + rejected {failed}"]
    return []


def eval_coverage(eval_dir: str, manifest: dict, allow_partial: bool, flag_hint: str) -> dict:
    """The coverage of an eval set; raises EvalCoverageError when it is partial and that
    was not allowed."""
    c = manifest["counters"]
    listed, embedded = c.get("eval_images_listed", 0), c.get("eval_images_embedded", 0)
    bad_lines = c.get("eval_annotation_lines_bad", 0)
    failed = listed - embedded
    coverage = {"listed": listed, "embedded": embedded, "bad_annotation_lines": bad_lines,
                "complete": failed == 0 and bad_lines == 0 and listed > 0}
    if listed == 0:
        raise EvalCoverageError(f"{flag_hint}: no evaluation image was found; check the path (and --eval_image_root)")
    if embedded == 0:
        # Even --allow_partial_eval: an empty matrix would keep every candidate unchecked.
        raise EvalCoverageError(
            f"none of the {listed} evaluation images could be embedded (see {eval_dir}/rejected/eval_images/); "
            "nothing to check candidates against"
        )
    if coverage["complete"] or allow_partial:
        return coverage
    examples = []
    for path in FileSystems.match([f"{eval_dir}/rejected/eval_images/*"])[0].metadata_list:
        with FileSystems.open(path.path) as f:
            for line in f.read().decode("utf-8").splitlines():
                r = json.loads(line)
                examples.append(f"{r.get('key') or r.get('source')} ({r['reason']})")
                if len(examples) >= 10:
                    break
    raise EvalCoverageError(
        f"{failed} of {listed} evaluation images could not be read, decoded or embedded"
        + (f" and {bad_lines} annotation lines have no image id" if bad_lines else "")
        + f", e.g. {', '.join(sorted(examples)[:10])}; all are listed in {eval_dir}/rejected/eval_images/. "
        "No shard was written: candidates would not have been checked against them. Fix or remove those images "
        "and run again, or pass --allow_partial_eval to write shards checked against the others only "
        "(the manifest then records the partial coverage)."
    )


def build_filter_pipeline(p, args, inputs, eval_dir: str, formats, threads, share_eval: bool, share_clip: bool = False):
    """Phase 2: read, decode, embed and filter the candidates against eval_set/, write shards."""
    # Files are matched inside the job (a list of 100k shards would be pickled into it).
    units, unit_rejects = p | "Units" >> ShardUnits(
        args.input, any(not is_tar(f) for f in inputs), any(is_tar(f) for f in inputs), pair_companions=True
    )
    rejects = [unit_rejects]
    read = (
        units
        | "MeasureSpread" >> MeasureShuffle("spread_units")
        | "SpreadUnits" >> beam.Reshuffle()
        | "ReadCandidates" >> beam.ParDo(ReadCandidateImages(input_root(args.input))).with_outputs(REJECTED, main="candidates")
    )
    embedded = read.candidates | "EmbedCandidates" >> EmbedImages(
        "decode", "embed", clip_handler(args, threads, share_clip), args.max_pixels, decode_side(args),
        args.max_image_bytes,
    )
    filtered = (
        embedded["vectors"]
        | "NearestEval"
        >> RunInference(KeyedModelHandler(EvalMatrixHandler(eval_dir, share_across_processes=share_eval)))
        | "DropNearDuplicates" >> beam.ParDo(DropNearDuplicates(args.threshold, args.reject_thumbnails == "yes")).with_outputs(REJECTED, main="samples")
    )
    _ = (
        filtered.samples
        | "WriteShards" >> WriteShards(args.output, SHARD_NAME, formats, num_shards=args.num_shards)
        | "RecordWritten" >> RecordWritten(args.output, SHARD_NAME)
    )
    rejects += [read[REJECTED], embedded["rejected"], filtered[REJECTED]]
    _ = tuple(rejects) | "WriteRejects" >> WriteRejects(args.output, STAGES)


def check_counts(c: dict, formats=("parquet",)) -> list[str]:
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
    problems += written_gaps(c, "write_shards", g("decontaminate_kept", 0), SHARD_NAME, formats)
    return problems


def validate(args) -> None:
    positive("--batch_size", args.batch_size)
    positive("--max_pixels", args.max_pixels)
    positive("--max_image_bytes", args.max_image_bytes)
    if not -1.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine in [-1, 1], got {args.threshold}")
    if bool(args.eval_images) == bool(args.eval_embeddings):
        raise UsageError("give either --eval_images (embed the evaluation set) or --eval_embeddings (reuse one)")
    if args.eval_images and is_annotation_file(args.eval_images):
        if not args.eval_image_root:
            raise UsageError("--eval_images is an annotation file: give --eval_image_root, the folder of its images")
        if not FileSystems.exists(args.eval_images):
            raise UsageError(f"--eval_images: no such file {args.eval_images!r}")
        if "://" not in args.eval_image_root and not os.path.isdir(args.eval_image_root):
            raise UsageError(f"--eval_image_root: no such folder {args.eval_image_root!r}")


def reused_eval_set(args) -> tuple[str, dict]:
    folder = args.eval_embeddings.rstrip("/")
    try:
        manifest = read_json(f"{folder}/manifest.json")
    except Exception as e:  # noqa: BLE001 - missing file, bad JSON, unreachable bucket alike
        raise UsageError(
            f"--eval_embeddings {folder!r} is not an eval set ({type(e).__name__}: {e}); give the eval_set/ "
            "folder of an earlier decontaminate run"
        ) from e
    clip = manifest.get("clip", {})
    if (clip.get("model"), clip.get("pretrained")) != (args.clip_model, args.clip_pretrained):
        raise UsageError(
            f"--eval_embeddings {folder!r} was embedded with {clip.get('model')}/{clip.get('pretrained')}, "
            f"this run uses {args.clip_model}/{args.clip_pretrained}: vectors of two models cannot be compared"
        )
    # Eval sets made before --decode_draft existed decoded at full size.
    theirs = manifest.get("decode", {"draft": False, "draft_side": 0})
    if theirs != decode_record(args):
        raise UsageError(
            f"--eval_embeddings {folder!r} decoded its images with draft={'yes' if theirs.get('draft') else 'no'} "
            f"(side {theirs.get('draft_side', 0)}), this run with --decode_draft {args.decode_draft} "
            f"(side {decode_side(args)}): pass --decode_draft {'yes' if theirs.get('draft') else 'no'} "
            "or embed the evaluation images again (--eval_images)"
        )
    return folder, manifest


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    args, options = parse(build_parser(), argv)
    validate(args)
    formats = parse_formats(args.formats)
    validate_clip_args(args.clip_model, args.clip_pretrained)
    inputs = match_files(args.input, "--input")
    for warning in check_finished_input(inputs, "--input", args.allow_unfinished_input):
        log.warning(warning)
    threads = threads_per_process(options, args.threads)
    share_eval = shared(args.share_eval, options)
    # auto: on a GPU, one model per machine (several SDK processes must not each load it onto
    # the device); on CPU, a copy per process (shipping decoded images to one holder costs
    # more than the copy saves).
    share_clip = shared(args.share_clip, options, auto=args.device != "cpu" and worker_processes(options) != 1)
    out = args.output.rstrip("/")
    if args.eval_embeddings:
        eval_dir, eval_manifest = reused_eval_set(args)
    else:
        eval_dir = f"{out}/{EVAL_SET_DIR}"
        ep = beam.Pipeline(options=options)
        build_eval_pipeline(ep, args, eval_dir, threads, share_clip)
        eval_manifest = run_job(ep, options, "decontaminate (evaluation set)", lambda ran: finish_run(
                **ran.fields(),
                name="decontaminate, evaluation set",
                output=eval_dir,
                kind="eval_embeddings",
                check=check_eval_counts,
                fields={
                    "eval_images": args.eval_images,
                    "eval_image_root": args.eval_image_root,
                    "clip": {"model": args.clip_model, "pretrained": args.clip_pretrained},
                    "decode": decode_record(args),
                    "files": [EVAL_VECTORS_FILE, EVAL_IDS_FILE],
                },
            ))
    # Checked before the candidates are read: a partial eval set stops the run here.
    coverage = None if is_dry_run(options) else eval_coverage(
        eval_dir, eval_manifest, args.allow_partial_eval, "--eval_embeddings" if args.eval_embeddings else "--eval_images"
    )
    p = test_pipeline or beam.Pipeline(options=options)
    build_filter_pipeline(p, args, inputs, eval_dir, formats, threads, share_eval, share_clip)
    listed = rows_listed(inputs)
    return run_job(p, options, "decontaminate", lambda ran: finish(ran, args, inputs, eval_dir, coverage, formats),
                   output=out, outputs=(SHARD_NAME,), expected=("candidates_read", listed) if listed else None)


def finish(ran, args, inputs, eval_dir: str, coverage: dict, formats) -> dict:
    out = args.output.rstrip("/")
    lines = []
    if not coverage["complete"]:
        lines.append(
            f"WARNING (--allow_partial_eval): only {coverage['embedded']} of {coverage['listed']} evaluation images "
            f"were embedded; candidates were not checked against the others (see {eval_dir}/rejected/eval_images/)"
        )
    lines.append(f"shards: {out}/{SHARD_NAME}-*   rejects: {out}/rejected/   manifest: {out}/manifest.json")
    return finish_run(
        name="decontaminate",
        output=out,
        kind="decontaminated_shards",
        **ran.fields(),
        check=lambda c: check_counts(c, formats),
        fields={
            "inputs": input_summary(args.input, inputs),
            "eval_set": eval_dir,
            "eval_images": {
                "listed": coverage["listed"],
                "embedded": coverage["embedded"],
                "coverage": "complete" if coverage["complete"] else "partial (--allow_partial_eval)",
            },
            "threshold": args.threshold,
            "clip": {"model": args.clip_model, "pretrained": args.clip_pretrained},
            "decode": decode_record(args),
            "formats": list(formats),
            "shards": f"{SHARD_NAME}-SSSSS-of-NNNNN.{{parquet,tfrecord,tar}}",
            "options": vars(args),
        },
        lines=tuple(lines),
    )


if __name__ == "__main__":
    cli_main(run)
