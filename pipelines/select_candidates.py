"""Select, for each entity, its top-K images by caption similarity (GER's Entity-LAION kNN
join), with no image given to two entities.

    python -m pipelines.select_candidates --entity_index out/entity_index \\
        --captions 'laion/part-*.parquet' --k 50 --output out/candidates

Input formats (`--caption_format`):
  laion_parquet  LAION metadata Parquet, URL + caption only (columns --url_col / --text_col,
                 default URL / TEXT); the output is then ready for img2dataset.
  webdataset     img2dataset .tar shards (KEY.jpg / KEY.txt / KEY.json); images carried over.
  parquet        Parquet with an image-bytes column (img2dataset's parquet output:
                 key / caption / url / jpg); images carried over.
  csv, tsv       caption lists (plain or .gz), URL + caption: CC3M / CC12M are TSV without a
                 header row (--csv_header no; columns caption, url by default, --csv_columns);
                 a CSV / TSV with a header row names its columns (--text_col / --url_col).
  jsonl          JSON lines, one object per image (--text_col / --url_col, default caption / url).
Output: candidates-SSSSS-of-NNNNN.parquet (key, url, caption, qid, title, score, rank, ...,
and image for image corpora), rejected/<stage>/rejects-*.jsonl, manifest.json with the
counters. Steps and memory: see ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam

from transforms.errors import UsageError
from transforms.formats.files import match_files
from transforms.formats.keys import input_root
from transforms.formats.webdataset import DEFAULT_LIMITS, TAR_SUFFIXES, TarLimits
from transforms.io.readers import (
    CAPTION_FORMATS,
    RAW_CAPTION_FACTOR,
    REJECTED,
    TEXT_LIST_FORMATS,
    CaptionColumns,
    ListFiles,
    ReadParquetCaptions,
    ReadTextListCaptions,
    ReadWebDatasetCaptions,
    SplitParquet,
)
from transforms.io.writers import CountWritten, WriteRecordsToParquet, WriteRejects
from transforms.models.embedding import SentenceTransformerHandler
from transforms.models.faiss_index import FaissSearchHandler
from transforms.models.text_encoder import BACKENDS, check_backend, index_encoder
from transforms.run.job import run_job, sum_counters, threads_per_process
from transforms.run.manifest import RecordWritten, finish_run, input_summary, summarize_files
from transforms.run.options import (
    add_output,
    add_shards,
    add_share,
    add_text_encoder,
    add_threads,
    cli_main,
    new_parser,
    parse,
    positive,
    shared,
)
from transforms.run.shuffles import MeasureShuffle
from transforms.schema import Candidate
from transforms.stages.build_entity_index import ENTITIES_FILE, INDEX_FILE, read_manifest
from transforms.stages.select_candidates import AttachImages, EmbedAndSearch, SelectFromSearchResults

log = logging.getLogger(__name__)

STAGES = ["read_captions", "embed", "search", "select"]
OUTPUT_NAME = "candidates"
IMAGE_FORMATS = ("webdataset", "parquet")
# Output columns for img2dataset's --save_additional_columns (it writes url/caption itself).
IMG2DATASET_EXTRA = ["qid", "title", "score", "rank", "entity_id"]


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.select_candidates")
    p.add_argument("--entity_index", required=True, help="directory written by build_entity_index")
    p.add_argument("--captions", required=True, help="caption shards: path, dir, glob or comma list")
    add_output(p)
    p.add_argument("--k", type=int, default=50, help="images kept per entity (top-K captions)")
    p.add_argument("--caption_format", choices=CAPTION_FORMATS, default="laion_parquet",
                   help="laion_parquet: URL/TEXT metadata; webdataset: img2dataset .tar shards; parquet: caption + image columns; "
                        "csv / tsv / jsonl: caption lists (plain or .gz)")
    p.add_argument("--csv_header", choices=("yes", "no"), default="yes",
                   help="csv / tsv: the first row names the columns; no: the columns are --csv_columns (CC3M / CC12M)")
    p.add_argument("--csv_columns", default="caption,url",
                   help="csv / tsv without a header row: the names of its columns, in order")
    p.add_argument(
        "--per_caption_entities",
        type=int,
        default=5,
        help="M: entities each caption proposes itself to (its M nearest titles)",
    )
    p.add_argument("--min_score", type=float, default=0.3, help="minimum cosine to propose")
    p.add_argument("--text_col", default=None, help="caption column (default TEXT for laion_parquet, caption otherwise)")
    p.add_argument("--url_col", default=None, help="URL column (default URL for laion_parquet, url otherwise)")
    p.add_argument("--key_col", default=None, help="image key column (default key; else a hash of the URL)")
    p.add_argument("--image_col", default=None, help="image bytes column for --caption_format parquet (default jpg)")
    p.add_argument("--keep_columns", default="", help="comma list of extra corpus columns to carry (meta_json)")
    p.add_argument("--max_caption_chars", type=int, default=2000,
                   help=f"longer captions are rejected (a raw value over {RAW_CAPTION_FACTOR}x this is refused before it is decoded)")
    p.add_argument("--max_tar_members", type=int, default=DEFAULT_LIMITS.max_members,
                   help="members in one webdataset tar; the rest of a larger tar is one reject (too_many_members)")
    p.add_argument("--max_sample_bytes", type=int, default=DEFAULT_LIMITS.max_sample_bytes,
                   help="bytes of one webdataset sample's members; a larger sample is a reject (sample_too_large)")
    p.add_argument("--max_tar_bytes", type=int, default=DEFAULT_LIMITS.max_tar_bytes,
                   help="caption and metadata bytes held for one webdataset tar; past it the rest of the tar is one reject (tar_too_large)")
    p.add_argument(
        "--text_model",
        default=None,
        help="override the caption encoder; default: the entity index's model (must match)",
    )
    p.add_argument("--batch_size", type=int, default=256, help="captions per entity-index search call")
    p.add_argument("--text_backend", choices=BACKENDS, default=None,
                   help="the text encoder's runtime; default (and the only one allowed): the one the entity index was built with")
    add_text_encoder(p, "--embed_chunk", "captions")
    add_threads(p)
    p.add_argument(
        "--nprobe",
        type=int,
        default=0,
        help="IVF cells searched; 0 = the value build_entity_index calibrated for the index (its manifest's search.params)",
    )
    add_share(p, "--share_index", "load the faiss index once per machine and share it across SDK processes")
    add_shards(p, shuffle_note=False)
    p.add_argument(
        "--hot_key_fanout",
        type=int,
        default=8,
        help="pre-combine each entity's top-K on this many workers before the final merge "
        "(generic titles draw millions of proposals); 0 or 1 = off",
    )
    return p


def validate(args, manifest) -> None:
    positive("--k", args.k)
    positive("--per_caption_entities", args.per_caption_entities)
    positive("--batch_size", args.batch_size)
    positive("--embed_chunk", args.embed_chunk)
    if args.embed_tokens_per_pass < 0:
        raise UsageError(f"--embed_tokens_per_pass must be 0 (automatic) or positive, got {args.embed_tokens_per_pass}")
    positive("--max_caption_chars", args.max_caption_chars)
    for flag in ("--max_tar_members", "--max_sample_bytes", "--max_tar_bytes"):
        positive(flag, getattr(args, flag[2:]))
    if not -1.0 <= args.min_score <= 1.0:
        raise UsageError(f"--min_score is a cosine in [-1, 1], got {args.min_score}")
    check_backend(args.text_backend, manifest)
    if args.text_model and args.text_model != manifest["model"]:
        log.warning(
            "--text_model %s differs from the entity index's model %s: scores are only "
            "meaningful when both sides use the same encoder",
            args.text_model,
            manifest["model"],
        )
    if args.image_col and args.caption_format != "parquet":
        raise UsageError("--image_col only applies to --caption_format parquet")
    if args.caption_format not in ("csv", "tsv") and (args.csv_header != "yes" or args.csv_columns != "caption,url"):
        raise UsageError(f"--csv_header / --csv_columns only apply to --caption_format csv or tsv, not {args.caption_format}")


def tar_limits(args) -> TarLimits:
    return TarLimits(max_members=args.max_tar_members, max_sample_bytes=args.max_sample_bytes, max_tar_bytes=args.max_tar_bytes)


def read_captions(p, args, columns: CaptionColumns):
    """-> (captions, rejects). Caption files are matched inside the pipeline; no image
    bytes are read here (image corpora: each caption carries its image's location)."""
    root = input_root(args.captions)
    if args.caption_format == "webdataset":
        units = (
            p
            # img2dataset writes a .parquet and a _stats.json beside each tar: tars only.
            | "CaptionFiles" >> ListFiles(args.captions, suffixes=TAR_SUFFIXES)
            | "MeasureSpread" >> MeasureShuffle("spread_units")
            | "SpreadTars" >> beam.Reshuffle()
        )
        read = units | "ReadTars" >> beam.ParDo(
            ReadWebDatasetCaptions(columns, args.max_caption_chars, root, tar_limits(args))
        ).with_outputs(REJECTED, main="captions")
        return read.captions, [read[REJECTED]]
    if args.caption_format in TEXT_LIST_FORMATS:
        # A list is read by one worker per file, then its captions are spread over the
        # workers for the encoder (a 12M-line CC12M file is one file).
        units = p | "CaptionFiles" >> ListFiles(args.captions) | "MeasureSpread" >> MeasureShuffle("spread_units") | "SpreadFiles" >> beam.Reshuffle()
        read = units | "ReadLists" >> beam.ParDo(
            ReadTextListCaptions(args.caption_format, columns, args.max_caption_chars, root,
                                 header=args.csv_header == "yes", names=tuple(c for c in args.csv_columns.split(",") if c))
        ).with_outputs(REJECTED, main="captions")
        spread = read.captions | "MeasureCaptions" >> MeasureShuffle("spread_captions") | "SpreadCaptions" >> beam.Reshuffle()
        return spread, [read[REJECTED]]
    split = (
        p
        | "CaptionFiles" >> ListFiles(args.captions)
        | "SplitRowGroups" >> beam.ParDo(SplitParquet()).with_outputs(REJECTED, main="units")
    )
    units = split.units | "MeasureSpread" >> MeasureShuffle("spread_units") | "SpreadRowGroups" >> beam.Reshuffle()
    read = units | "ReadRowGroups" >> beam.ParDo(
        ReadParquetCaptions(args.caption_format, columns, args.max_caption_chars, root)
    ).with_outputs(REJECTED, main="captions")
    return read.captions, [split[REJECTED], read[REJECTED]]


def build_pipeline(p, args, manifest, threads, share_index):
    columns = CaptionColumns(
        text=args.text_col,
        url=args.url_col,
        key=args.key_col,
        image=args.image_col,
        keep=tuple(c for c in args.keep_columns.split(",") if c),
    )
    captions, rejects = read_captions(p, args, columns)
    text_handler = SentenceTransformerHandler(
        args.text_model or index_encoder(manifest, args.entity_index),
        batch_size=args.embed_chunk,
        max_tokens_per_batch=args.embed_tokens_per_pass,
        device=args.device,
        threads=threads,
    )
    search_handler = FaissSearchHandler(
        f"{args.entity_index.rstrip('/')}/{INDEX_FILE}",
        args.per_caption_entities,
        batch_size=args.batch_size,
        threads=threads,
        nprobe=args.nprobe,
        search_params=manifest.get("search", {}).get("params", {}),
        share_across_processes=share_index,
    )
    searched = captions | "EmbedAndSearch" >> EmbedAndSearch(text_handler, search_handler)
    entities = (
        p
        | "ReadEntityTable"
        >> beam.io.ReadFromParquet(
            f"{args.entity_index.rstrip('/')}/{ENTITIES_FILE}", columns=["int_id", "qid", "title"]
        )
        | "EntityKV" >> beam.Map(lambda r: (int(r["int_id"]), (r["qid"], r["title"])))
    )
    selected = searched["searched"] | "Select" >> SelectFromSearchResults(
        entities, args.k, args.per_caption_entities, args.min_score, args.hot_key_fanout
    )
    candidates = selected["candidates"]
    rejects += [searched["rejected"], selected["rejected"]]
    if args.caption_format in IMAGE_FORMATS:
        attached = candidates | "AttachImages" >> AttachImages(columns.defaults(args.caption_format).image)
        candidates = attached.candidates
        rejects.append(attached[REJECTED])
        exclude: tuple[str, ...] = ("image_ref",)
    else:
        exclude = ("image", "image_ref")
    _ = (
        candidates
        | "WriteCandidates"
        >> WriteRecordsToParquet(
            f"{args.output.rstrip('/')}/{OUTPUT_NAME}", Candidate, exclude=exclude, num_shards=args.num_shards
        )
        # Counted again in the finished files: what the count check compares.
        | "CountWritten" >> CountWritten(OUTPUT_NAME)
        | "Summary" >> summarize_files()
        | "RecordWritten" >> RecordWritten(args.output, OUTPUT_NAME)
    )
    _ = tuple(rejects) | "WriteRejects" >> WriteRejects(args.output, STAGES)


def check_counts(c: dict) -> list[str]:
    """The identities the counters must satisfy; one message per identity that fails."""
    g = c.get
    problems = []
    read = g("captions_rows_read", 0)
    rejected_read = sum_counters(c, "rejected_read_captions_")
    if read != g("captions_rows_ok", 0) + rejected_read:
        problems.append(f"rows read {read} != ok {g('captions_rows_ok', 0)} + rejected {rejected_read}")
    failed = g("rejected_embed_embed_failed", 0) + g("rejected_search_search_failed", 0)
    if g("captions_rows_ok", 0) != g("captions_searched", 0) + failed:
        problems.append("rows ok != searched + embed/search failures")
    if g("captions_searched", 0) != g("captions_proposing", 0) + g("captions_below_min_score", 0):
        problems.append("searched != proposing + below min_score")
    if g("proposals_in_top_k", 0) != g("images_kept", 0) + g("proposals_lost_to_other_entity", 0):
        problems.append("in top-K != kept + lost to another entity")
    lost_images = g("rejected_select_image_missing", 0) + g("rejected_select_key_collision", 0)
    if g("images_kept", 0) != g("written_candidates", 0) + lost_images:
        problems.append(
            f"select: images kept {g('images_kept', 0)} != rows in the candidate files {g('written_candidates', 0)} "
            f"+ image missing / key collisions {lost_images}"
        )
    if g("proposals_lost_to_other_entity", 0) != g("rejected_select_assigned_to_other_entity", 0):
        problems.append("lost to other entity != its rejects")
    return problems


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    args, options = parse(build_parser(), argv)
    manifest = read_manifest(args.entity_index)
    validate(args, manifest)
    files = match_files(args.captions, "--captions")
    threads = threads_per_process(options, args.threads)
    share = shared(args.share_index, options)
    p = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(p, args, manifest, threads, share)
    return run_job(p, options, "select_candidates", lambda ran: finish(ran, args, manifest, files),
                   output=args.output, outputs=(OUTPUT_NAME,))


def finish(ran, args, manifest, files) -> dict:
    out = args.output.rstrip("/")
    lines = [f"candidates: {out}/candidates-*.parquet   rejects: {out}/rejected/   manifest: {out}/manifest.json"]
    if args.caption_format not in IMAGE_FORMATS:
        cols = shlex.quote(str(IMG2DATASET_EXTRA).replace("'", '"'))
        lines.append(
            "download the selected images with:\n  img2dataset --url_list "
            f"{out} --input_format parquet --url_col url --caption_col caption "
            f"--save_additional_columns {cols} --output_format webdataset --output_folder IMAGES"
        )
    counters = ran.counters
    return finish_run(
        **ran.fields(),
        name="select_candidates",
        output=out,
        kind="candidates",
        check=check_counts,
        fields={
            "entity_index": args.entity_index,
            "entity_index_manifest": {k: manifest[k] for k in ("model", "dimension", "num_entities", "index_factory")},
            "inputs": input_summary(args.captions, files),
            "options": vars(args),
            "derived": {
                "proposals_not_in_top_k": counters.get("proposals", 0) - counters.get("proposals_in_top_k", 0),
            },
        },
        lines=tuple(lines),
    )


if __name__ == "__main__":
    cli_main(run)
