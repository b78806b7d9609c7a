"""REW: a multimodal LLM verifies or corrects each entity label, the answer is grounded to a
catalog entity, and a visual rationale and QA pairs are written.

    python -m pipelines.refine --input 'out/shards/samples-*.parquet' --entities wiki6m.jsonl \\
        --entity_index out/entity_index --llm_backend openai --endpoint http://localhost:8000 \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --cache out/llm_cache --output out/rew

Backends (`--llm_backend`): `openai` (any OpenAI-compatible server: vllm serve, SGLang,
llama.cpp, hosted APIs; API key from --api_key_secret (Secret Manager, read on the worker)
or the env variable named by --api_key_env; a job-wide request / token budget with
--max_total_concurrency, --max_requests_per_minute, --max_tokens_per_minute),
`openai_batch` (the OpenAI Batch API at batch prices, in resumable rounds: see
transforms/llm/batch.py; --wait to poll until done), `vllm` (vLLM
on the worker through Beam's VLLMChatModelHandler, one server per machine, stopped at the
end of the run; `pip install .[vllm]`), `replay`
(answers only from --cache; a miss is rejected as not_in_cache). Answers are cached in
--cache by request hash: a killed run started again sends no request already answered.
--estimate_only prints the requests, tokens and dollars a run would take, and sends nothing.
Output: REW shards samples-*.{parquet,tfrecord,tar} (qid/title = the final entity, plus
candidate_qid, verdict, rationale, qa_json, model and prompt ids), rejected/<stage>/,
manifest.json with counts per verdict and reject reason, tokens and cost.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from prompts import CONTEXTS, MODES, load_prompt
from transforms.errors import UsageError
from transforms.formats.files import match_files
from transforms.formats.webdataset import is_tar
from transforms.io.images import DEFAULT_LLM_MAX_SIDE
from transforms.io.readers import REJECTED, ReadCatalogFile, ShardUnits
from transforms.io.writers import SHARD_FORMATS, WriteRejects, WriteShards, parse_formats
from transforms.llm.client import DIALECTS, OpenAICompatibleHandler, ReplayHandler
from transforms.llm.cost import IMAGE_TOKEN_RULES
from transforms.run.job import (
    build_only,
    is_dry_run,
    run_and_count,
    sum_counters,
    threads_per_process,
    worker_processes,
)
from transforms.run.manifest import (
    RecordWritten,
    check_finished_input,
    finish_run,
    input_summary,
    prepare_output,
    rows_listed,
    written_gaps,
)
from transforms.run.options import cli_main, new_parser, parse, positive
from transforms.run.shuffles import MeasureShuffle
from transforms.stages.build_entity_index import read_manifest
from transforms.stages.refine import (
    PENDING_TAG,
    ApplyGrounding,
    GroundingHandler,
    InterpretRationale,
    InterpretVerify,
    ReadSamples,
    RequestSettings,
    WithImages,
    attach_summary,
    catalog_summary,
    rationale_request,
    verify_request,
)

log = logging.getLogger(__name__)

OUTPUT_NAME = "samples"

STAGES = ["read_samples", "read_catalog", "verify", "ground", "rationale_qa"]
BACKENDS = ("openai", "openai_batch", "vllm", "replay")


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.refine")
    p.add_argument("--input", required=True, help="decontaminate shards: Parquet and/or webdataset .tar")
    p.add_argument(
        "--allow_unfinished_input",
        action="store_true",
        help="read shards of ours even when their folder has no manifest.json or does not match it "
        "(the run that wrote them did not finish); off by default, so a killed run is not read as whole",
    )
    p.add_argument("--entities", required=True, help="the catalog (for Wikipedia summaries)")
    p.add_argument("--entity_index", default=None, help="entity index (grounding); required unless --estimate_only")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--llm_backend", choices=BACKENDS, default=None, help="required unless --estimate_only")
    p.add_argument("--model", required=True, help="model id sent to the endpoint (and part of the cache key)")
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument(
        "--vllm_server_arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra `vllm serve` argument for --llm_backend vllm (repeatable), e.g. max-model-len=4096",
    )
    p.add_argument("--wait", action="store_true", help="openai_batch: poll and go on until every round is done")
    p.add_argument("--batch_poll", type=float, default=60.0, help="openai_batch: seconds between polls with --wait")
    p.add_argument("--batch_max_requests", type=int, default=50_000, help="openai_batch: requests per batch file")
    p.add_argument("--batch_max_mb", type=float, default=190.0, help="openai_batch: MB per batch file (OpenAI: 200)")
    p.add_argument(
        "--batch_max_resubmits", type=int, default=2,
        help="openai_batch: a request that did not come back is asked again in this many more batches, then rejected",
    )
    p.add_argument(
        "--batch_submit", choices=("yes", "no"), default="yes",
        help="openai_batch: no = only write the request files (JSONL that `vllm run-batch` reads) under <output>/_batch/requests/",
    )
    p.add_argument("--batch_results", default=None, help="openai_batch: batch output files to read into the cache (e.g. vllm run-batch's)")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key (local runs)")
    p.add_argument(
        "--api_key_secret", default=None, metavar="projects/P/secrets/S/versions/V",
        help="Secret Manager secret holding the API key, read on each worker with its service account (Dataflow "
        "workers do not see the launcher's environment); wins over --api_key_env",
    )
    p.add_argument("--secret_manager_endpoint", default=None, help="another Secret Manager API root (private / regional endpoint)")
    p.add_argument("--cache", default=None, help="response cache folder (local or gs://)")
    p.add_argument("--mode", choices=MODES, default="correct", help="direct = ask without the candidate (ablation)")
    p.add_argument("--context", choices=CONTEXTS, default="wiki_caption", help="none = no caption / summary (ablation)")
    p.add_argument("--verify_prompt", default="v1", help="version of the verify prompt in prompts/ (recorded in the manifest)")
    p.add_argument("--rationale_prompt", default="v1", help="version of the rationale + QA prompt in prompts/")
    p.add_argument("--max_concurrency", type=int, default=16, help="requests in flight per SDK process (a cap)")
    p.add_argument(
        "--max_total_concurrency",
        type=int,
        default=0,
        help="requests in flight for the whole job, divided among the SDK processes actually running "
        "(re-divided when the runner scales); 0 = only --max_concurrency per process",
    )
    p.add_argument(
        "--max_requests_per_minute", type=float, default=0.0,
        help="request rate for the whole job (the provider's RPM limit), divided among the running processes; 0 = none",
    )
    p.add_argument(
        "--max_tokens_per_minute", type=float, default=0.0,
        help="input + output tokens per minute for the whole job (the provider's TPM limit; a request reserves its "
        "estimate and max_tokens until its usage comes back); 0 = none",
    )
    p.add_argument(
        "--budget_dir", default=None,
        help="folder every worker can reach where the processes sharing the job-wide budget register "
        "(default <output>/_llm_budget); used only with a --max_total_concurrency / --max_*_per_minute",
    )
    p.add_argument("--budget_refresh", type=float, default=10.0, help="seconds between budget heartbeats and re-division")
    p.add_argument(
        "--image_tokens", choices=IMAGE_TOKEN_RULES, default="openai",
        help="how the serving model counts image tokens (estimates and the token budget): openai, gemini, qwen2_vl",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max_retries", type=int, default=5, help="on 5xx / timeouts / dropped connections")
    p.add_argument(
        "--max_rate_limit_wait",
        type=float,
        default=900.0,
        help="seconds one request may wait in total while the server answers 429/503 (each wait at least its "
        "Retry-After; the whole process pauses with it); then the sample is rejected, saying how long it waited",
    )
    p.add_argument("--retry_backoff", type=float, default=1.0, help="first retry delay in seconds (doubles, full jitter)")
    p.add_argument("--max_reasks", type=int, default=1, help="re-asks after an answer that fails the schema")
    p.add_argument("--structured_output", choices=DIALECTS, default="json_schema", help="first form tried; falls back")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every LLM request")
    p.add_argument("--max_tokens", type=int, default=512, help="output token cap of every LLM request")
    p.add_argument(
        "--max_image_side",
        type=int,
        default=DEFAULT_LLM_MAX_SIDE,
        help="downscale images whose longer side is larger before sending them (JPEG q90; the cache key "
        "is computed on what is sent); 0 = send as stored",
    )
    p.add_argument("--seed", type=int, default=0, help="seed sent with each request (where the backend honours it)")
    p.add_argument("--min_ground_score", type=float, default=0.8, help="embedding grounding floor (cosine)")
    p.add_argument("--usd_per_million_input_tokens", type=float, default=None, help="online price (manifest and estimate)")
    p.add_argument("--usd_per_million_output_tokens", type=float, default=None, help="online price (manifest and estimate)")
    p.add_argument(
        "--batch_price_factor", type=float, default=0.5,
        help="batch price / online price (OpenAI Batch API and Vertex AI batch prediction: 0.5)",
    )
    p.add_argument(
        "--estimate_only", action="store_true",
        help="read the input, count the requests and estimate tokens and cost (online and batch), send nothing, write nothing",
    )
    p.add_argument("--expected_verify_tokens", type=int, default=60, help="estimate: output tokens of a verify answer")
    p.add_argument("--expected_rationale_tokens", type=int, default=350, help="estimate: output tokens of a rationale + QA answer")
    p.add_argument("--formats", default=",".join(SHARD_FORMATS), help=f"comma list of {SHARD_FORMATS}")
    p.add_argument("--threads", type=int, default=0, help="torch/faiss threads of the grounder; 0 = cores / processes")
    p.add_argument(
        "--share_grounding",
        choices=("auto", "yes", "no"),
        default="auto",
        help="hold the grounding tables, the faiss index and the text encoder once per machine and "
        "serve them to every SDK process (auto: when the runner starts more than one process per machine)",
    )
    p.add_argument("--num_shards", type=int, default=0, help="output shards; 0 = runner decides (no shuffle)")
    return p


def llm_handler(args, processes: int = 1):
    if args.llm_backend == "vllm":
        try:
            from transforms.llm.vllm import make_vllm_handler, split_server_kwargs
        except ImportError as e:
            raise UsageError(f"--llm_backend vllm needs vLLM and the openai client: pip install .[vllm] ({e})") from e
        from transforms.run.secrets import is_secret_name, register_secret

        kwargs = {}
        for item in args.vllm_server_arg:
            key, sep, value = item.partition("=")
            if not key:
                raise UsageError(f"--vllm_server_arg {item!r}: expected KEY=VALUE or KEY")
            kwargs[key.lstrip("-")] = value if sep else None
            if sep and is_secret_name(key):
                register_secret(value)  # redacted from here on, whatever the form it is logged in
        try:
            split_server_kwargs(kwargs)  # a secret vLLM can only read from its command line is refused
        except ValueError as e:
            raise UsageError(f"--vllm_server_arg: {e}") from None
        try:
            return make_vllm_handler(
                args.model, vllm_server_kwargs=kwargs, cache_dir=args.cache, max_concurrency=args.max_concurrency,
                timeout_s=args.timeout, max_retries=args.max_retries, max_reasks=args.max_reasks,
            )
        except ImportError as e:
            raise UsageError(f"--llm_backend vllm needs vLLM and the openai client: pip install .[vllm] ({e})") from e
    if args.llm_backend == "openai_batch":
        from transforms.llm.batch import BatchRequestHandler, batch_dir

        return BatchRequestHandler(args.cache, batch_dir(args.output), args.max_reasks, args.batch_max_resubmits)
    if args.llm_backend == "replay":
        if not args.cache:
            raise UsageError("--llm_backend replay answers from --cache: give the cache folder")
        return ReplayHandler(args.cache, max_reasks=args.max_reasks)
    if not args.endpoint:
        raise UsageError("--llm_backend openai needs --endpoint (the server's base URL, e.g. http://localhost:8000/v1)")
    positive("--max_concurrency", args.max_concurrency)
    return OpenAICompatibleHandler(
        args.endpoint,
        cache_dir=args.cache,
        api_key_env=args.api_key_env,
        max_concurrency=args.max_concurrency,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
        backoff_s=args.retry_backoff,
        max_rate_limit_wait_s=args.max_rate_limit_wait,
        max_reasks=args.max_reasks,
        dialect=args.structured_output,
        batch_size=max(args.max_concurrency * 4, 16),
        total_concurrency=args.max_total_concurrency,
        requests_per_minute=args.max_requests_per_minute,
        tokens_per_minute=args.max_tokens_per_minute,
        budget_dir=args.budget_dir or f"{args.output.rstrip('/')}/_llm_budget",
        budget_refresh_s=args.budget_refresh,
        expected_processes=max(1, processes),
        image_token_rule=args.image_tokens,
        api_key_secret=args.api_key_secret,
        secret_manager_endpoint=args.secret_manager_endpoint,
    )


def batch_client_spec(args):
    """How the batch backend reaches the provider; None with --batch_submit no."""
    if args.llm_backend != "openai_batch" or args.batch_submit == "no":
        return None
    from transforms.llm.batch import BatchClientSpec

    return BatchClientSpec(
        endpoint=args.endpoint, api_key_env=args.api_key_env, api_key_secret=args.api_key_secret,
        secret_manager_endpoint=args.secret_manager_endpoint, timeout_s=args.timeout, max_retries=args.max_retries,
    )


def run_batch_rounds(args, options, first_pipeline, build):
    """--llm_backend openai_batch: collect what earlier rounds submitted, run a round, and
    (with --wait) again until nothing is pending. (counters, seconds) when the run is
    complete; (None, status) when batches are still running or were just submitted."""
    import time

    from transforms.llm.batch import batch_dir, collect
    from transforms.llm.cache import compact

    folder = batch_dir(args.output)
    spec = batch_client_spec(args)
    results = match_files(args.batch_results, "--batch_results") if args.batch_results else []
    p = first_pipeline
    while True:
        got = collect(folder, args.cache, spec, results)
        results = []
        if got["collected"] or got["answers"]:
            log.info("batches collected: %s", got)
        if got["running"]:
            status = {"status": "batches_running", "running": got["running"], "batch_dir": folder}
            if not args.wait:
                print(f"{got['running']} batches still running; run the same command again later (or add --wait)")
                return None, status
            time.sleep(args.batch_poll)
            continue
        compact(args.cache, options)
        if p is None:
            p = beam.Pipeline(options=options)
            build(p)
        counters, seconds = run_and_count(p, "refine")
        p = None
        pending = counters.get("batch_pending_verify", 0) + counters.get("batch_pending_rationale_qa", 0)
        if not pending:
            return counters, seconds
        submitted = counters.get("batch_requests_submitted", 0)
        status = {"status": "batches_submitted", "pending_requests": pending, "submitted": submitted,
                  "batches": counters.get("batches_submitted", 0), "batch_dir": folder}
        if spec is None:
            print(f"{submitted} requests written to {folder}/requests/ (--batch_submit no): run them, e.g. with "
                  f"`vllm run-batch`, then run again with --batch_results")
            return None, status
        if not args.wait:
            print(f"{submitted} requests submitted in {status['batches']} batches; run the same command again to "
                  f"collect them and go on (or add --wait)")
            return None, status
        time.sleep(args.batch_poll)


def build_pipeline(p, args, inputs, catalog_files, threads, share_grounding: bool = False, processes: int = 1):
    verify_prompt = load_prompt("verify", args.verify_prompt)
    rationale_prompt = load_prompt("rationale_qa", args.rationale_prompt)
    settings = RequestSettings(
        args.model,
        args.mode,
        args.context,
        {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed},
        max_image_side=args.max_image_side,
    )
    # Files are matched inside the job (a list of 100k shards would be pickled into it).
    units, unit_rejects = p | "Units" >> ShardUnits(
        args.input, any(not is_tar(f) for f in inputs), any(is_tar(f) for f in inputs)
    )
    rejects = [unit_rejects]
    read = (
        units
        | "MeasureSpread" >> MeasureShuffle("spread_units")
        | "Spread" >> beam.Reshuffle()
        | "ReadSamples" >> beam.ParDo(ReadSamples()).with_outputs(REJECTED, main="samples")
    )
    catalog = (
        p
        | "CatalogFiles" >> beam.Create(list(enumerate(catalog_files)))
        | "ReadCatalog" >> beam.ParDo(ReadCatalogFile()).with_outputs(REJECTED, main="entities")
    )
    summaries = catalog.entities | "Summaries" >> beam.Map(catalog_summary)
    handler = llm_handler(args, processes)
    # Samples travel without their image bytes: through the joins with the summaries, and
    # back to their shard file, where only the images needed are read again.
    candidate = (
        {
            "sample": read.samples
            | "ByCandidate" >> beam.Map(lambda loc: (loc.sample.qid, loc))
            | "MeasureCandidate" >> MeasureShuffle("join_candidate_summary"),
            "summary": summaries | "MeasureSummaries1" >> MeasureShuffle("join_candidate_summary"),
        }
        | "JoinCandidateSummary" >> beam.CoGroupByKey()
        | "CandidateSummary" >> beam.FlatMap(attach_summary)
        | "VerifyImages" >> WithImages("verify", "verify_images")
    )
    verified = (
        candidate["items"]
        | "VerifyRequests" >> beam.Map(verify_request, verify_prompt, settings)
        | "Verify" >> RunInference(handler)
        | "InterpretVerify"
        >> beam.ParDo(InterpretVerify(verify_prompt)).with_outputs(REJECTED, "ground", PENDING_TAG, main="final")
    )
    grounded = (
        verified.ground
        | "GroundNames"
        >> RunInference(
            GroundingHandler(
                args.entity_index,
                read_manifest(args.entity_index)["model"],
                args.min_ground_score,
                threads,
                share_across_processes=share_grounding,
            )
        )
        | "ApplyGrounding" >> beam.ParDo(ApplyGrounding()).with_outputs(REJECTED, main="final")
    )
    finals = (verified.final, grounded.final) | "Finals" >> beam.Flatten()
    final = (
        {
            "sample": finals
            | "ByFinal" >> beam.Map(lambda loc: (loc.sample.qid, loc))
            | "MeasureFinal" >> MeasureShuffle("join_final_summary"),
            "summary": summaries | "MeasureSummaries2" >> MeasureShuffle("join_final_summary"),
        }
        | "JoinFinalSummary" >> beam.CoGroupByKey()
        | "FinalSummary" >> beam.FlatMap(attach_summary)
        | "RationaleImages" >> WithImages("rationale_qa", "rationale_images")
    )
    refined = (
        final["items"]
        | "RationaleRequests" >> beam.Map(rationale_request, rationale_prompt, settings)
        | "RationaleQA" >> RunInference(handler)
        | "InterpretRationale"
        >> beam.ParDo(InterpretRationale(rationale_prompt)).with_outputs(REJECTED, PENDING_TAG, main="samples")
    )
    if args.llm_backend == "openai_batch":
        from transforms.llm.batch import SubmitBatches, batch_dir

        _ = (
            (verified[PENDING_TAG], refined[PENDING_TAG])
            | "Pending" >> beam.Flatten()
            | "SubmitBatches" >> SubmitBatches(
                batch_dir(args.output), batch_client_spec(args), args.batch_max_requests, int(args.batch_max_mb * 1e6),
                args.run_id,
            )
        )
    _ = (
        refined.samples
        | "WriteShards" >> WriteShards(args.output, OUTPUT_NAME, parse_formats(args.formats), args.num_shards)
        | "RecordWritten" >> RecordWritten(args.output, OUTPUT_NAME)
    )
    rejects += [
        read[REJECTED],
        catalog[REJECTED],
        candidate[REJECTED],
        verified[REJECTED],
        grounded[REJECTED],
        final[REJECTED],
        refined[REJECTED],
    ]
    _ = tuple(rejects) | "WriteRejects" >> WriteRejects(args.output, STAGES)


def build_estimate(p, args, inputs, catalog_files):
    """The part of the pipeline before the first request, counting instead of sending."""
    from transforms.stages.refine import EstimateTokens

    settings = RequestSettings(
        args.model, args.mode, args.context, {"max_tokens": args.max_tokens}, max_image_side=args.max_image_side
    )
    units, _ = p | "Units" >> ShardUnits(args.input, any(not is_tar(f) for f in inputs), any(is_tar(f) for f in inputs))
    read = (
        units
        | "Spread" >> beam.Reshuffle()
        | "ReadSamples" >> beam.ParDo(ReadSamples()).with_outputs(REJECTED, main="samples")
    )
    catalog = (
        p
        | "CatalogFiles" >> beam.Create(list(enumerate(catalog_files)))
        | "ReadCatalog" >> beam.ParDo(ReadCatalogFile()).with_outputs(REJECTED, main="entities")
    )
    _ = (
        {
            "sample": read.samples | "ByCandidate" >> beam.Map(lambda loc: (loc.sample.qid, loc)),
            "summary": catalog.entities | "Summaries" >> beam.Map(catalog_summary),
        }
        | "JoinCandidateSummary" >> beam.CoGroupByKey()
        | "CandidateSummary" >> beam.FlatMap(attach_summary)
        | "Estimate" >> beam.ParDo(
            EstimateTokens(load_prompt("verify", args.verify_prompt), load_prompt("rationale_qa", args.rationale_prompt),
                           settings, args.image_tokens)
        )
    )


def estimate(c: dict, args) -> dict:
    """The estimate from the counters: requests, tokens, dollars online and in batch."""
    from transforms.llm.cost import MESSAGE_OVERHEAD_TOKENS, dollars

    n = c.get("estimate_samples", 0)
    images = c.get("estimate_image_tokens", 0)
    text = c.get("estimate_verify_text_tokens", 0) + c.get("estimate_rationale_text_tokens", 0) + 2 * n * MESSAGE_OVERHEAD_TOKENS
    tokens_in = text + 2 * images  # the image goes with both requests
    expected_out = n * (min(args.expected_verify_tokens, args.max_tokens) + min(args.expected_rationale_tokens, args.max_tokens))
    most_out = 2 * n * args.max_tokens
    usd_in, usd_out = args.usd_per_million_input_tokens, args.usd_per_million_output_tokens
    online = dollars(tokens_in, expected_out, usd_in, usd_out)
    online_most = dollars(tokens_in, most_out, usd_in, usd_out)
    f = args.batch_price_factor
    return {
        "samples": n,
        "requests": {"verify": n, "rationale_qa_at_most": n, "at_most": 2 * n},
        "input_tokens": {"text": text, "image": 2 * images, "total": tokens_in, "image_rule": args.image_tokens,
                         "max_image_side": args.max_image_side, "images_without_size": c.get("estimate_images_without_size", 0)},
        "output_tokens": {"expected": expected_out, "at_most": most_out},
        "usd": None if online is None else {
            "online": online, "online_at_most": online_most,
            "batch": round(online * f, 9), "batch_at_most": round(online_most * f, 9), "batch_price_factor": f,
        },
        "rejected_reading": sum_counters(c, "rejected_read_samples_"),
    }


def _estimate_lines(e: dict) -> list[str]:
    n = e["samples"]
    t = e["input_tokens"]
    lines = [
        f"refine estimate for {n} samples (nothing sent, nothing written)",
        f"  requests       verify {n} + rationale_qa up to {n} (one per sample verify keeps) = up to {2 * n}",
        f"  input tokens   {t['total']:,} = text {t['text']:,} + images {t['image']:,} "
        f"({t['image_rule']} rule, longer side <= {t['max_image_side']} px)",
        f"  output tokens  {e['output_tokens']['expected']:,} expected, at most {e['output_tokens']['at_most']:,} (--max_tokens)",
    ]
    if t["images_without_size"]:
        lines.append(f"  {t['images_without_size']} samples without width/height: counted as max_image_side squares")
    if e["usd"] is None:
        lines.append("  cost           give --usd_per_million_input_tokens / --usd_per_million_output_tokens for dollars")
    else:
        u = e["usd"]
        lines.append(f"  cost online    ${u['online']:,.2f} expected, ${u['online_at_most']:,.2f} at most")
        lines.append(f"  cost batch     ${u['batch']:,.2f} expected, ${u['batch_at_most']:,.2f} at most (x{u['batch_price_factor']:g})")
    if e["rejected_reading"]:
        lines.append(f"  {e['rejected_reading']} samples could not be read and are not counted")
    return lines


def check_counts(c: dict, formats=("parquet",)) -> list[str]:
    g = c.get
    problems = []
    read = g("samples_read", 0) - sum_counters(c, "rejected_read_samples_")
    verdicts = g("verdict_correct", 0) + g("verdict_corrected", 0) + g("verdict_not_an_entity", 0)
    verify_failed = sum_counters(c, "rejected_verify_") - g("rejected_verify_not_an_entity", 0)
    if read != verdicts + verify_failed:
        problems.append(f"samples {read} != verdicts {verdicts} + verify failures {verify_failed}")
    to_rationale = g("verdict_correct", 0) + g("verdict_corrected", 0) - g("rejected_ground_ungrounded", 0)
    if to_rationale != g("samples_refined", 0) + sum_counters(c, "rejected_rationale_qa_"):
        problems.append("verified + grounded != refined + rationale failures")
    problems += written_gaps(c, "write_shards", g("samples_refined", 0), OUTPUT_NAME, formats)
    return problems


def _expected(inputs: list[str]):
    listed = rows_listed(inputs)
    return ("samples_read", listed) if listed else None


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    args, options = parse(build_parser(), argv)
    if args.estimate_only:
        inputs = match_files(args.input, "--input")
        catalog_files = match_files(args.entities, "--entities")
        p = test_pipeline or beam.Pipeline(options=options)
        build_estimate(p, args, inputs, catalog_files)
        counters, _seconds = run_and_count(p, "refine")
        result = estimate(counters, args)
        for line in _estimate_lines(result):
            print(line)
        return result
    if not args.llm_backend:
        raise UsageError("--llm_backend is required (openai, vllm or replay), unless --estimate_only")
    if not args.entity_index:
        raise UsageError("--entity_index is required: the index build_entity_index wrote (grounding of corrected names)")
    positive("--max_retries", args.max_retries, minimum=0)
    positive("--max_reasks", args.max_reasks, minimum=0)
    for flag in ("max_total_concurrency", "max_requests_per_minute", "max_tokens_per_minute"):
        positive(f"--{flag}", getattr(args, flag), minimum=0)
    positive("--budget_refresh", args.budget_refresh, minimum=0.05)
    if args.api_key_secret:
        from transforms.run.secrets import secret_version_name

        try:
            args.api_key_secret = secret_version_name(args.api_key_secret)
        except ValueError as e:
            raise UsageError(f"--api_key_secret: {e}") from e
    read_manifest(args.entity_index)
    inputs = match_files(args.input, "--input")
    for warning in check_finished_input(inputs, "--input", args.allow_unfinished_input):
        log.warning(warning)
    catalog_files = match_files(args.entities, "--entities")
    for name, version in (("verify", args.verify_prompt), ("rationale_qa", args.rationale_prompt)):
        try:
            load_prompt(name, version)
        except ValueError as e:
            flag = "--verify_prompt" if name == "verify" else "--rationale_prompt"
            raise UsageError(f"{flag}: {e}") from e
    threads = threads_per_process(options, args.threads)
    if args.llm_backend == "openai_batch":
        if args.batch_submit == "yes" and not args.endpoint:
            raise UsageError("--llm_backend openai_batch needs --endpoint (the provider's base URL, e.g. https://api.openai.com/v1), "
                             "or --batch_submit no to only write the request files")
        positive("--batch_max_requests", args.batch_max_requests)
        positive("--batch_max_resubmits", args.batch_max_resubmits, minimum=0)
        if not args.cache:
            from transforms.llm.batch import batch_dir

            args.cache = f"{batch_dir(args.output)}/cache"
            log.info("--llm_backend openai_batch keeps answers in a cache: %s (give --cache to choose)", args.cache)
    import uuid

    args.run_id = uuid.uuid4().hex[:12]
    p = test_pipeline or beam.Pipeline(options=options)
    share = {"yes": True, "no": False}.get(args.share_grounding, worker_processes(options) != 1)
    build = lambda pipeline: build_pipeline(  # noqa: E731
        pipeline, args, inputs, catalog_files, threads, share, worker_processes(options)
    )
    build(p)
    if is_dry_run(options):
        return build_only(p, "refine")
    prepare_output(args.output, (OUTPUT_NAME,))
    started = dt.datetime.now(dt.UTC)
    if args.cache and args.llm_backend != "openai_batch":
        # What earlier runs wrote (a killed one included) becomes readable by hash.
        from transforms.llm.cache import compact

        compact(args.cache, options)
    batch = None
    if args.llm_backend == "openai_batch":
        from transforms.llm.batch import batch_dir, batch_totals

        counters, seconds = run_batch_rounds(args, options, p, build)
        if counters is None:
            return seconds  # the round's status: batches running or just submitted
        batch = batch_totals(batch_dir(args.output))
    elif args.llm_backend == "vllm":

        from transforms.llm.vllm import RUN_ENV, shutdown_vllm_servers

        os.environ[RUN_ENV] = uuid.uuid4().hex
        try:
            counters, seconds = run_and_count(p, "refine", _expected(inputs))
        finally:
            # Beam leaves the vllm server running after the pipeline: stop this run's.
            log.info("stopped vllm servers: %s", shutdown_vllm_servers())
    else:
        counters, seconds = run_and_count(p, "refine", _expected(inputs))
    tokens_in, tokens_out = counters.get("llm_prompt_tokens", 0), counters.get("llm_completion_tokens", 0)
    if batch is not None:  # the batches answered; this run read them from the cache
        tokens_in, tokens_out = batch["tokens"]["input"], batch["tokens"]["output"]
    from transforms.llm.cost import dollars

    cost = dollars(tokens_in, tokens_out, args.usd_per_million_input_tokens, args.usd_per_million_output_tokens)
    out = args.output.rstrip("/")
    return finish_run(
        name="refine",
        output=out,
        kind="rew_shards",
        counters=counters,
        seconds=seconds,
        started=started,
        check=lambda c: check_counts(c, parse_formats(args.formats)),
        fields={
            "inputs": input_summary(args.input, inputs),
            "model": args.model,
            "backend": args.llm_backend,
            "prompts": {
                "verify": f"verify/{args.verify_prompt}@{load_prompt('verify', args.verify_prompt).sha256}",
                "rationale_qa": f"rationale_qa/{args.rationale_prompt}@{load_prompt('rationale_qa', args.rationale_prompt).sha256}",
            },
            "verdicts": {k[len('verdict_'):]: v for k, v in counters.items() if k.startswith("verdict_")},
            "rejects": {k[len('rejected_'):]: v for k, v in counters.items() if k.startswith("rejected_")},
            "tokens": {"input": tokens_in, "output": tokens_out},
            "requests_sent": counters.get("llm_requests_sent", 0),
            "cache_hits": counters.get("llm_cache_hits_total", 0),
            # At online prices; and what the same tokens cost through a provider's batch API
            # (--batch_price_factor): what a batch run paid.
            "cost_usd": cost,
            "cost_usd_at_batch_prices": None if cost is None else round(cost * args.batch_price_factor, 9),
            "batch": batch,
            "options": {k: v for k, v in vars(args).items() if k not in ("api_key_env", "run_id")},
        },
        lines=(
            f"tokens in/out: {tokens_in}/{tokens_out}"
            + (f"  cost: ${cost} (at batch prices: ${round(cost * args.batch_price_factor, 9)})" if cost is not None else ""),
            f"REW shards: {out}/samples-*   rejects: {out}/rejected/   manifest: {out}/manifest.json",
        ),
    )


if __name__ == "__main__":
    cli_main(run)
