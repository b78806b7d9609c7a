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

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from importlib import resources
from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from prompts import CONTEXTS, DEFAULT_VERSIONS, MODES, load_prompt
from transforms.errors import UsageError
from transforms.formats.files import match_files
from transforms.formats.webdataset import is_tar
from transforms.io.images import DEFAULT_LLM_MAX_SIDE
from transforms.io.readers import REJECTED, ReadCatalogFile, ShardUnits
from transforms.io.writers import SHARD_FORMATS, WriteRejects, WriteShards, parse_formats
from transforms.llm.batch import (
    BatchClientSpec,
    BatchRequestHandler,
    SubmitBatches,
    batch_dir,
    batch_totals,
    collect,
)
from transforms.llm.cache import compact
from transforms.llm.client import DIALECTS, OpenAICompatibleHandler, ReplayHandler
from transforms.llm.cost import IMAGE_TOKEN_RULES, MESSAGE_OVERHEAD_TOKENS, cheapest_readable_side, dollars
from transforms.llm.rew_cost import (
    LEGACY_IMAGE_SIDE,
    Prices,
    RewWorkload,
    add_design_flags,
    check_design_flags,
    designs,
    render_designs,
    self_hosted_from_data,
)
from transforms.run.job import (
    run_and_count,
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
from transforms.run.secrets import is_secret_name, register_secret, secret_version_name
from transforms.run.shuffles import MeasureShuffle
from transforms.stages.build_entity_index import read_manifest
from transforms.stages.ground import GroundingHandler
from transforms.stages.refine import (
    ESCALATE_REASONS,
    ESCALATE_TAG,
    PENDING_TAG,
    ApplyGrounding,
    Escalation,
    EstimateTokens,
    InterpretRationale,
    InterpretRew,
    InterpretVerify,
    ReadSamples,
    RequestSettings,
    WithSummary,
    catalog_summary,
    count_refined,
    rationale_request,
    rew_request,
    sample_name_item,
    verify_request,
)

log = logging.getLogger(__name__)

OUTPUT_NAME = "samples"

STAGES = ["read_samples", "read_catalog", "verify", "ground", "rationale_qa"]
BACKENDS = ("openai", "openai_batch", "vertex_batch", "vllm", "replay")
# Backends that answer in resumable rounds of provider batches (transforms/llm/batch.py).
BATCH_BACKENDS = ("openai_batch", "vertex_batch")


def build_parser():
    p = new_parser(__doc__.split("\n\n")[0], "pipelines.refine")
    p.add_argument("--input", required=True, help="decontaminate shards: Parquet and/or webdataset .tar")
    add_unfinished_input(p)
    p.add_argument("--entities", required=True, help="the catalog (for Wikipedia summaries)")
    p.add_argument("--entity_index", default=None, help="entity index (grounding); required unless --estimate_only")
    add_output(p)
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
    p.add_argument("--vertex_project", default=None, help="vertex_batch: the Google Cloud project of the batch prediction jobs")
    p.add_argument("--vertex_location", default="us-central1", help="vertex_batch: the Vertex AI region")
    p.add_argument("--vertex_staging", default=None,
                   help="vertex_batch: gs:// folder for the jobs' request and output files (default <output>/_batch/vertex "
                        "when --output is on gs://)")
    p.add_argument("--vertex_endpoint", default=None,
                   help="vertex_batch: another API root (a regional or private endpoint; http://127.0.0.1:PORT: a local fake, no credentials)")
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
    p.add_argument("--verify_prompt", default=DEFAULT_VERSIONS["verify"],
                   help="version of the verify prompt in prompts/ (recorded in the manifest; v1: the caption before the "
                        "image, the layout of runs before prefix caching, whose caches it reuses)")
    p.add_argument("--rationale_prompt", default=DEFAULT_VERSIONS["rationale_qa"], help="version of the rationale + QA prompt in prompts/")
    p.add_argument(
        "--rew_requests", type=int, choices=(1, 2), default=2,
        help="2: verify, then rationale + QA for the kept samples (the published REW design); 1: one request per "
        "sample answers both (--rew_prompt), a rejected sample pays no rationale. Compare the two on your data "
        "(docs/refine.md) before switching",
    )
    p.add_argument("--rew_prompt", default=DEFAULT_VERSIONS["rew"], help="version of the one-request prompt (--rew_requests 1)")
    p.add_argument(
        "--escalate_backend", choices=("openai", "vllm", "replay"), default=None,
        help="a second backend for the uncertain answers of the first (--escalate_when); its answer is final",
    )
    p.add_argument("--escalate_model", default=None, help="model id of --escalate_backend (part of the cache key)")
    p.add_argument("--escalate_endpoint", default=None, help="OpenAI-compatible base URL of --escalate_backend openai")
    p.add_argument("--escalate_api_key_env", default="OPENAI_API_KEY", help="environment variable with the escalation backend's key")
    p.add_argument(
        "--escalate_when", default=",".join(ESCALATE_REASONS),
        help="comma list of: low_confidence (the verdict's probability from the first backend's logprobs is below "
        "--escalate_below; a backend that returns no logprobs never triggers it), ungrounded (its corrected name "
        "matches no catalog entity), invalid (its answer failed the schema after the re-asks)",
    )
    p.add_argument("--escalate_below", type=float, default=0.8, help="low_confidence: verdict probability under which to escalate")
    p.add_argument("--escalate_usd_per_million_input_tokens", type=float, default=None, help="escalation backend's price (manifest)")
    p.add_argument("--escalate_usd_per_million_output_tokens", type=float, default=None, help="escalation backend's price (manifest)")
    p.add_argument("--escalate_usd_per_million_cached_input_tokens", type=float, default=None,
                   help="escalation backend's price of input tokens read from its prefix cache (default: its input price)")
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
        "--image_tokens", choices=IMAGE_TOKEN_RULES, default=None,
        help="how the serving model counts image tokens (estimates and the token budget); default: --llm_prices's "
        "rule, else openai",
    )
    p.add_argument(
        "--llm_prices", default=None, metavar="MODEL",
        help="a model of pipelines/plan_data/prices.json (gpt-4.1-mini, gemini-2.0-flash-lite, ...): its prices and "
        "image-token rule where --usd_per_million_* / --image_tokens are not given",
    )
    add_design_flags(p)
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
    p.add_argument("--usd_per_million_cached_input_tokens", type=float, default=None,
                   help="price of input tokens the provider read from its prefix cache (usage's cached_tokens; "
                        "default: the input price)")
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
    add_threads(p, "torch/faiss threads of the grounder")
    add_share(p, "--share_grounding", "hold the grounding tables, the faiss index and the text encoder once per machine "
              "and serve them to every SDK process")
    add_shards(p, formats=",".join(SHARD_FORMATS))
    return p


def llm_handler(args, processes: int = 1, role: str = ""):
    """The first backend's handler, or with role "escalate" the escalation backend's (its
    model, endpoint and key; the same limits, its own budget registry)."""
    backend, model, endpoint, key_env = args.llm_backend, args.model, args.endpoint, args.api_key_env
    if role:
        backend, model, endpoint, key_env = (args.escalate_backend, args.escalate_model, args.escalate_endpoint,
                                             args.escalate_api_key_env)
    budget_dir = args.budget_dir or f"{args.output.rstrip('/')}/_llm_budget"
    if role:
        budget_dir = f"{budget_dir.rstrip('/')}/{role}"
    if backend == "vllm":
        try:
            from transforms.llm.vllm import make_vllm_handler, split_server_kwargs
        except ImportError as e:
            raise UsageError(f"--llm_backend vllm needs vLLM and the openai client: pip install .[vllm] ({e})") from e

        kwargs = {}
        for item in args.vllm_server_arg:
            key, sep, value = item.partition("=")
            if not key:
                raise UsageError(f"--vllm_server_arg {item!r}: expected KEY=VALUE or KEY")
            kwargs[key.lstrip("-")] = value if sep else None
            if sep and is_secret_name(key):
                register_secret(value)  # redacted from here on, whatever the form it is logged in
        if not {"enable-prefix-caching", "no-enable-prefix-caching"} & set(kwargs):
            # The prompts' static part and each entity's context are shared prefixes (prompts/):
            # vLLM keeps their KV blocks and skips recomputing them.
            kwargs["enable-prefix-caching"] = None
        try:
            split_server_kwargs(kwargs)  # a secret vLLM can only read from its command line is refused
        except ValueError as e:
            raise UsageError(f"--vllm_server_arg: {e}") from None
        try:
            return make_vllm_handler(
                model, vllm_server_kwargs=kwargs, cache_dir=args.cache, max_concurrency=args.max_concurrency,
                timeout_s=args.timeout, max_retries=args.max_retries, max_reasks=args.max_reasks,
            )
        except ImportError as e:
            raise UsageError(f"--llm_backend vllm needs vLLM and the openai client: pip install .[vllm] ({e})") from e
    if backend in BATCH_BACKENDS:
        return BatchRequestHandler(args.cache, batch_dir(args.output), args.max_reasks, args.batch_max_resubmits)
    if backend == "replay":
        if not args.cache:
            raise UsageError("--llm_backend replay answers from --cache: give the cache folder")
        return ReplayHandler(args.cache, max_reasks=args.max_reasks)
    if not endpoint:
        flag = "--escalate_endpoint" if role else "--endpoint"
        raise UsageError(f"{'--escalate_backend' if role else '--llm_backend'} openai needs {flag} (the server's base URL, "
                         "e.g. http://localhost:8000/v1)")
    positive("--max_concurrency", args.max_concurrency)
    return OpenAICompatibleHandler(
        endpoint,
        cache_dir=args.cache,
        api_key_env=key_env,
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
        budget_dir=budget_dir,
        budget_refresh_s=args.budget_refresh,
        expected_processes=max(1, processes),
        image_token_rule=args.image_tokens,
        api_key_secret=args.api_key_secret,
        secret_manager_endpoint=args.secret_manager_endpoint,
    )


def batch_client_spec(args):
    """How the batch backend reaches the provider; None with --batch_submit no."""
    if args.llm_backend not in BATCH_BACKENDS or args.batch_submit == "no":
        return None

    if args.llm_backend == "vertex_batch":
        return BatchClientSpec(
            provider="vertex", vertex_project=args.vertex_project, vertex_location=args.vertex_location,
            vertex_staging=args.vertex_staging, vertex_endpoint=args.vertex_endpoint, timeout_s=args.timeout,
            max_retries=args.max_retries,
        )
    return BatchClientSpec(
        endpoint=args.endpoint, api_key_env=args.api_key_env, api_key_secret=args.api_key_secret,
        secret_manager_endpoint=args.secret_manager_endpoint, timeout_s=args.timeout, max_retries=args.max_retries,
    )


def run_batch_rounds(args, options, first_pipeline, build):
    """--llm_backend openai_batch: collect what earlier rounds submitted, run a round, and
    (with --wait) again until nothing is pending. (counters, seconds) when the run is
    complete; (None, status) when batches are still running or were just submitted."""
    import time


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


def read_inputs(p, args, inputs, catalog_files):
    """-> (located samples without image bytes, (qid, summary) pairs of the catalog, rejects)."""
    # Files are matched inside the job (a list of 100k shards would be pickled into it).
    units, unit_rejects = p | "Units" >> ShardUnits(
        args.input, any(not is_tar(f) for f in inputs), any(is_tar(f) for f in inputs)
    )
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
    return read.samples, summaries, [unit_rejects, read[REJECTED], catalog[REJECTED]]


def grounding(args, threads, share: bool):
    """The grounding step: corrected names -> catalog QIDs. Both verify stages (the first
    backend's and the escalation backend's) use it under one model identifier, so the
    title tables, the index and the encoder are held once."""
    return RunInference(
        GroundingHandler(
            args.entity_index,
            read_manifest(args.entity_index)["model"],
            args.min_ground_score,
            threads,
            item_fn=sample_name_item,
            share_across_processes=share,
        ),
        model_identifier=f"grounder-{args.run_id}",
    )


def verify_stage(items, args, prompt, settings, handler, ground, escalation=None, role: str = ""):
    """(Located, summary) -> the answers of one backend, interpreted and grounded: {"final",
    "rejected" (a list), "pending", "escalate" (a list)}. With --rew_requests 1 the answer
    carries the rationale too. Labels of the first backend's steps are the ones refine has
    always had; the escalation backend's start with "Escalate"."""
    one = args.rew_requests == 1
    name = "Rew" if one else "Verify"
    def label(step: str) -> str:
        return f"Escalate{step}" if role else step

    answered = (
        items
        | label(f"{name}Requests") >> beam.Map(rew_request if one else verify_request, prompt, settings)
        | label(name) >> RunInference(handler)
        | label(f"Interpret{name}")
        >> beam.ParDo((InterpretRew if one else InterpretVerify)(prompt, escalation, role)).with_outputs(
            REJECTED, "ground", PENDING_TAG, ESCALATE_TAG, main="final"
        )
    )
    grounded = (
        answered.ground
        | label("GroundNames") >> ground
        | label("ApplyGrounding")
        >> beam.ParDo(ApplyGrounding(escalate_ungrounded=escalation is not None and "ungrounded" in escalation.when))
        .with_outputs(REJECTED, ESCALATE_TAG, main="final")
    )
    return {
        "final": (answered.final, grounded.final) | label("Finals") >> beam.Flatten(),
        "rejected": [answered[REJECTED], grounded[REJECTED]],
        "pending": answered[PENDING_TAG],
        "escalate": [answered[ESCALATE_TAG], grounded[ESCALATE_TAG]],
    }


def escalation_of(args):
    if not args.escalate_backend:
        return None
    return Escalation(frozenset(w for w in args.escalate_when.split(",") if w), args.escalate_below)


def request_settings(args, model: str, logprobs: bool = False) -> RequestSettings:
    sampling = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed}
    if logprobs:
        # The verdict's probability (escalation on low confidence); part of the cache key.
        sampling["logprobs"] = True
    return RequestSettings(model, args.mode, args.context, sampling, max_image_side=args.max_image_side)


def build_pipeline(p, args, inputs, catalog_files, threads, share_grounding: bool = False, processes: int = 1):
    one = args.rew_requests == 1
    verify_prompt = load_prompt("rew", args.rew_prompt) if one else load_prompt("verify", args.verify_prompt)
    rationale_prompt = load_prompt("rationale_qa", args.rationale_prompt)
    escalation = escalation_of(args)
    settings = request_settings(args, args.model, logprobs=escalation is not None and "low_confidence" in escalation.when)
    samples, summaries, rejects = read_inputs(p, args, inputs, catalog_files)
    handler = llm_handler(args, processes)
    ground = grounding(args, threads, share_grounding)
    # Samples travel without their image bytes: through the joins with the summaries, and
    # back to their shard file, where only the images needed are read again.
    candidate = samples | "CandidateSummary" >> WithSummary(
        summaries, "join_candidate_summary", images=("verify", "verify_images")
    )
    rejects.append(candidate["rejected"])
    first = verify_stage(candidate["items"], args, verify_prompt, settings, handler, ground, escalation)
    stages = [first]
    pending = [first["pending"]]
    escalate_handler = escalate_settings = None
    if escalation is not None:
        escalate_handler = llm_handler(args, processes, role="escalate")
        escalate_settings = request_settings(args, args.escalate_model)
        asked = (
            first["escalate"]
            | "Escalated" >> beam.Flatten()
            | "EscalateSummary" >> WithSummary(summaries, "join_escalate_summary", images=("verify", "escalate_images"))
        )
        rejects.append(asked["rejected"])
        stages.append(verify_stage(asked["items"], args, verify_prompt, escalate_settings, escalate_handler, ground,
                                   role="escalate"))
    for stage in stages:
        rejects += stage["rejected"]
    finals = tuple(stage["final"] for stage in stages) | "Decided" >> beam.Flatten()
    if one:
        refined = finals | "CountRefined" >> beam.Map(count_refined)
    else:
        final = finals | "FinalSummary" >> WithSummary(
            summaries, "join_final_summary", images=("rationale_qa", "rationale_images")
        )
        rejects.append(final["rejected"])
        streams = [(final["items"], handler, settings, "")]
        if escalation is not None:
            # The model that decided a sample writes its rationale.
            mine, escalated = final["items"] | "ByDecider" >> beam.Partition(
                lambda item, n: int(bool(item[0].sample.escalated)), 2
            )
            streams = [(mine, handler, settings, ""), (escalated, escalate_handler, escalate_settings, "escalate")]
        outs = []
        for items, h, st, role in streams:
            pre = "Escalate" if role else ""
            r = (
                items
                | f"{pre}RationaleRequests" >> beam.Map(rationale_request, rationale_prompt, st)
                | f"{pre}RationaleQA" >> RunInference(h)
                | f"{pre}InterpretRationale"
                >> beam.ParDo(InterpretRationale(rationale_prompt, role=role)).with_outputs(REJECTED, PENDING_TAG, main="samples")
            )
            outs.append(r.samples)
            rejects.append(r[REJECTED])
            pending.append(r[PENDING_TAG])
        refined = tuple(outs) | "Refined" >> beam.Flatten()
    if args.llm_backend in BATCH_BACKENDS:
        _ = (
            tuple(pending)
            | "Pending" >> beam.Flatten()
            | "SubmitBatches" >> SubmitBatches(
                batch_dir(args.output), batch_client_spec(args), args.batch_max_requests, int(args.batch_max_mb * 1e6),
                args.run_id,
            )
        )
    _ = (
        refined
        | "WriteShards" >> WriteShards(args.output, OUTPUT_NAME, parse_formats(args.formats), args.num_shards)
        | "RecordWritten" >> RecordWritten(args.output, OUTPUT_NAME)
    )
    _ = tuple(rejects) | "WriteRejects" >> WriteRejects(args.output, STAGES)


def design_sides(args) -> tuple[int, ...]:
    """The image sides the designs table prices: refine's former default, this run's, the cheapest."""
    return tuple(sorted({LEGACY_IMAGE_SIDE, args.max_image_side, cheapest_readable_side(args.image_tokens, args.min_readable_side)}))


def build_estimate(p, args, inputs, catalog_files):
    """The part of the pipeline before the first request, counting instead of sending."""
    settings = RequestSettings(
        args.model, args.mode, args.context, {"max_tokens": args.max_tokens}, max_image_side=args.max_image_side
    )
    samples, summaries, _ = read_inputs(p, args, inputs, catalog_files)
    _ = (
        (samples | "CandidateSummary" >> WithSummary(summaries, "join_candidate_summary"))["items"]
        | "Estimate" >> beam.ParDo(
            EstimateTokens(load_prompt("verify", args.verify_prompt), load_prompt("rationale_qa", args.rationale_prompt),
                           settings, args.image_tokens, load_prompt("rew", args.rew_prompt), design_sides(args))
        )
    )


def price_book(name: str) -> dict:
    """A file of pipelines/plan_data (the planner's prices and throughputs)."""
    return json.loads(resources.files("pipelines").joinpath("plan_data", f"{name}.json").read_text(encoding="utf-8"))


def resolve_prices(args) -> None:
    """--llm_prices fills the prices and the image rule the user did not give."""
    if args.llm_prices:
        book = price_book("prices").get("llm_per_million_tokens", {})
        entry = book.get(args.llm_prices)
        if not isinstance(entry, dict):
            known = ", ".join(k for k in book if not k.startswith("_"))
            raise UsageError(f"--llm_prices {args.llm_prices!r} is not in pipelines/plan_data/prices.json; known: {known}")
        if args.usd_per_million_input_tokens is None and args.usd_per_million_output_tokens is None:
            args.usd_per_million_input_tokens, args.usd_per_million_output_tokens = entry["input"], entry["output"]
            if args.usd_per_million_cached_input_tokens is None:
                args.usd_per_million_cached_input_tokens = entry.get("cached_input")
        args.image_tokens = args.image_tokens or entry.get("image_tokens")
    args.image_tokens = args.image_tokens or "openai"


def design_table(c: dict, args) -> Optional[list[dict]]:
    """REW's designs in $ per 1M samples from the measured prompt and image sizes; None
    without prices."""
    n = c.get("estimate_samples", 0)
    if not n or (args.usd_per_million_input_tokens is None and args.usd_per_million_output_tokens is None):
        return None
    over = MESSAGE_OVERHEAD_TOKENS
    mean = lambda name: c.get(name, 0) / n  # noqa: E731
    keep = args.keep_share
    out_v, out_r = min(args.expected_verify_tokens, args.max_tokens), min(args.expected_rationale_tokens, args.max_tokens)
    w = RewWorkload(
        verify_text=mean("estimate_verify_text_tokens") + over, rationale_text=mean("estimate_rationale_text_tokens") + over,
        rew_text=mean("estimate_rew_text_tokens") + over,
        image_tokens=lambda side: mean(f"estimate_image_tokens_at_{side}"), side=args.max_image_side,
        cheapest_side=cheapest_readable_side(args.image_tokens, args.min_readable_side), keep_share=keep,
        verify_out=out_v, rationale_out=out_r,
    )
    factor = args.batch_price_factor if args.llm_backend in BATCH_BACKENDS else 1.0
    prices = Prices(args.llm_prices or args.model, args.usd_per_million_input_tokens or 0.0,
                    args.usd_per_million_output_tokens or 0.0, factor)
    hosted = self_hosted_from_data(args.self_hosted_gpu, args.self_hosted_requests_per_s, out_v + keep * out_r,
                                   price_book("prices"), price_book("throughputs"))
    return [dict(r, prices=dataclasses.asdict(prices)) for r in designs(w, prices, hosted, args.escalate_share)]


def estimate(c: dict, args) -> dict:
    """The estimate from the counters: requests, tokens, dollars online and in batch."""

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
        "text_tokens_per_request": {
            task: round(c.get(f"estimate_{task}_text_tokens", 0) / n + MESSAGE_OVERHEAD_TOKENS, 1) if n else 0.0
            for task in ("verify", "rationale", "rew")
        },
        "designs": design_table(c, args),
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
    if e.get("designs"):
        prices = e["designs"][0]["prices"]
        lines += render_designs(e["designs"], Prices(**prices))
    if e["rejected_reading"]:
        lines.append(f"  {e['rejected_reading']} samples could not be read and are not counted")
    return lines


def check_counts(c: dict, formats=("parquet",)) -> list[str]:
    g = c.get
    problems = []
    read = g("samples_read", 0) - sum_counters(c, "rejected_read_samples_")
    verdicts = g("verdict_correct", 0) + g("verdict_corrected", 0) + g("verdict_not_an_entity", 0)
    verify_failed = sum_counters(c, "rejected_verify_") - g("rejected_verify_not_an_entity", 0)
    # An escalated sample has one verdict (its second) unless its first was counted before
    # it was escalated: a corrected name that did not ground.
    regrounded = g("escalated_ungrounded", 0)
    if read + regrounded != verdicts + verify_failed:
        problems.append(f"samples {read} (+ {regrounded} escalated after grounding) != verdicts {verdicts} + verify failures {verify_failed}")
    to_rationale = g("verdict_correct", 0) + g("verdict_corrected", 0) - g("rejected_ground_ungrounded", 0) - regrounded
    if to_rationale != g("samples_refined", 0) + sum_counters(c, "rejected_rationale_qa_"):
        problems.append("verified + grounded != refined + rationale failures")
    problems += written_gaps(c, "write_shards", g("samples_refined", 0), OUTPUT_NAME, formats)
    return problems


def _expected(inputs: list[str]):
    listed = rows_listed(inputs)
    return ("samples_read", listed) if listed else None


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    args, options = parse(build_parser(), argv)
    check_design_flags(args)
    resolve_prices(args)
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

        try:
            args.api_key_secret = secret_version_name(args.api_key_secret)
        except ValueError as e:
            raise UsageError(f"--api_key_secret: {e}") from e
    read_manifest(args.entity_index)
    inputs = match_files(args.input, "--input")
    for warning in check_finished_input(inputs, "--input", args.allow_unfinished_input):
        log.warning(warning)
    catalog_files = match_files(args.entities, "--entities")
    for name, version, flag in prompt_flags(args):
        try:
            load_prompt(name, version)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from e
    validate_escalation(args)
    threads = threads_per_process(options, args.threads)
    if args.llm_backend == "vertex_batch":
        validate_vertex(args)
    if args.llm_backend in BATCH_BACKENDS:
        if args.llm_backend == "openai_batch" and args.batch_submit == "yes" and not args.endpoint:
            raise UsageError("--llm_backend openai_batch needs --endpoint (the provider's base URL, e.g. https://api.openai.com/v1), "
                             "or --batch_submit no to only write the request files")
        positive("--batch_max_requests", args.batch_max_requests)
        positive("--batch_max_resubmits", args.batch_max_resubmits, minimum=0)
        if not args.cache:

            args.cache = f"{batch_dir(args.output)}/cache"
            log.info("--llm_backend %s keeps answers in a cache: %s (give --cache to choose)", args.llm_backend, args.cache)
    import uuid

    args.run_id = uuid.uuid4().hex[:12]
    p = test_pipeline or beam.Pipeline(options=options)
    share = shared(args.share_grounding, options)
    build = lambda pipeline: build_pipeline(  # noqa: E731
        pipeline, args, inputs, catalog_files, threads, share, worker_processes(options)
    )
    build(p)

    def execute():
        if args.llm_backend in BATCH_BACKENDS:
            # (None, status) while batches run or were just submitted.
            return run_batch_rounds(args, options, p, build)
        if args.cache:
            # What earlier runs wrote (a killed one included) becomes readable by hash.

            compact(args.cache, options)
        if args.llm_backend != "vllm":
            return run_and_count(p, "refine", _expected(inputs))
        from transforms.llm.vllm import RUN_ENV, shutdown_vllm_servers

        os.environ[RUN_ENV] = uuid.uuid4().hex
        try:
            return run_and_count(p, "refine", _expected(inputs))
        finally:
            # Beam leaves the vllm server running after the pipeline: stop this run's.
            log.info("stopped vllm servers: %s", shutdown_vllm_servers())

    return run_job(p, options, "refine", lambda ran: finish(ran, args, inputs), output=args.output,
                   outputs=(OUTPUT_NAME,), execute=execute)


def prompt_flags(args) -> list[tuple[str, str, str]]:
    """(task, version, flag) of the prompts this run sends."""
    if args.rew_requests == 1:
        return [("rew", args.rew_prompt, "--rew_prompt")]
    return [("verify", args.verify_prompt, "--verify_prompt"), ("rationale_qa", args.rationale_prompt, "--rationale_prompt")]


def validate_vertex(args) -> None:
    if not args.vertex_project:
        raise UsageError("--llm_backend vertex_batch needs --vertex_project (the project the batch prediction jobs run in)")
    if not args.vertex_staging:
        if not args.output.startswith("gs://"):
            raise UsageError("--llm_backend vertex_batch stages its request files where Vertex AI reads them: give "
                             "--vertex_staging gs://BUCKET/FOLDER (or an --output on gs://)")
        args.vertex_staging = f"{batch_dir(args.output)}/vertex"
    loopback = (args.vertex_endpoint or "").startswith(("http://127.0.0.1", "http://localhost"))
    if not args.vertex_staging.startswith("gs://") and not loopback:
        raise UsageError(f"--vertex_staging {args.vertex_staging!r}: Vertex AI reads and writes Cloud Storage: give a gs:// folder")


def validate_escalation(args) -> None:
    given = [f for f in ("escalate_model", "escalate_endpoint") if getattr(args, f)]
    if not args.escalate_backend:
        if given:
            raise UsageError(f"--{given[0]} without --escalate_backend: give the backend the uncertain answers go to")
        return
    if not args.escalate_model:
        raise UsageError("--escalate_backend needs --escalate_model (the model that decides the escalated samples)")
    when = [w for w in args.escalate_when.split(",") if w]
    unknown = [w for w in when if w not in ESCALATE_REASONS]
    if unknown or not when:
        raise UsageError(f"--escalate_when {args.escalate_when!r}: a comma list of {', '.join(ESCALATE_REASONS)}")
    if not 0.0 < args.escalate_below <= 1.0:
        raise UsageError(f"--escalate_below is a probability in (0, 1], got {args.escalate_below}")
    if (args.escalate_backend, args.escalate_model, args.escalate_endpoint) == (args.llm_backend, args.model, args.endpoint):
        raise UsageError("--escalate_backend / --escalate_model name the first backend again: escalate to another model")


def backend_usage(counters: dict, batch: Optional[dict]) -> dict:
    """Tokens and requests of each backend: the escalation backend's are counted under
    `llm_escalate_*`, the first backend's are the rest (with openai_batch, what the
    batches reported)."""
    g = counters.get
    esc = {"input": g("llm_escalate_prompt_tokens", 0), "output": g("llm_escalate_completion_tokens", 0),
           "cached": g("llm_escalate_cached_input_tokens", 0), "requests": g("llm_escalate_requests_sent", 0)}
    first = {"input": g("llm_prompt_tokens", 0) - esc["input"], "output": g("llm_completion_tokens", 0) - esc["output"],
             "cached": g("llm_cached_input_tokens", 0) - esc["cached"], "requests": g("llm_requests_sent", 0) - esc["requests"]}
    if batch is not None:  # the batches answered; this run read them from the cache
        first.update(input=batch["tokens"]["input"], output=batch["tokens"]["output"])
    return {"first": first, "escalate": esc}


def finish(ran, args, inputs) -> dict:
    counters = ran.counters
    batch = None
    if args.llm_backend in BATCH_BACKENDS:
        batch = batch_totals(batch_dir(args.output))
    usage = backend_usage(counters, batch)
    first, esc = usage["first"], usage["escalate"]
    tokens_in, tokens_out = first["input"] + esc["input"], first["output"] + esc["output"]
    cost = dollars(first["input"], first["output"], args.usd_per_million_input_tokens, args.usd_per_million_output_tokens,
                   first["cached"], args.usd_per_million_cached_input_tokens)
    backends = {"first": {"backend": args.llm_backend, "model": args.model, **first, "cost_usd": cost}}
    escalated = sum(v for k, v in counters.items() if k.startswith("escalated_"))
    if args.escalate_backend:
        esc_cost = dollars(esc["input"], esc["output"], args.escalate_usd_per_million_input_tokens,
                           args.escalate_usd_per_million_output_tokens, esc["cached"],
                           args.escalate_usd_per_million_cached_input_tokens)
        backends["escalate"] = {"backend": args.escalate_backend, "model": args.escalate_model, **esc, "cost_usd": esc_cost}
        cost = None if cost is None and esc_cost is None else round((cost or 0.0) + (esc_cost or 0.0), 9)
    read = counters.get("samples_read", 0) - sum_counters(counters, "rejected_read_samples_")
    out = args.output.rstrip("/")
    return finish_run(
        name="refine",
        output=out,
        kind="rew_shards",
        **ran.fields(),
        check=lambda c: check_counts(c, parse_formats(args.formats)),
        fields={
            "inputs": input_summary(args.input, inputs),
            "model": args.model,
            "backend": args.llm_backend,
            "rew_requests": args.rew_requests,
            "prompts": {task: f"{task}/{version}@{load_prompt(task, version).sha256}" for task, version, _ in prompt_flags(args)},
            "backends": backends,
            "escalation": None if not args.escalate_backend else {
                "when": args.escalate_when.split(","),
                "below": args.escalate_below,
                "escalated": {k[len("escalated_"):]: v for k, v in counters.items() if k.startswith("escalated_")},
                "escalated_share": round(escalated / read, 6) if read else 0.0,
            },
            "verdicts": {k[len('verdict_'):]: v for k, v in counters.items() if k.startswith("verdict_")},
            "rejects": {k[len('rejected_'):]: v for k, v in counters.items() if k.startswith("rejected_")},
            "tokens": {"input": tokens_in, "output": tokens_out, "cached_input": first["cached"] + esc["cached"]},
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
            *([f"escalated {escalated} of {read} samples ({100 * escalated / max(read, 1):.1f} %) to {args.escalate_model}: "
               f"tokens in/out {esc['input']}/{esc['output']}" + (f", ${backends['escalate']['cost_usd']}" if backends['escalate']['cost_usd'] is not None else "")]
              if args.escalate_backend else []),
            f"REW shards: {out}/samples-*   rejects: {out}/rejected/   manifest: {out}/manifest.json",
        ),
    )


if __name__ == "__main__":
    cli_main(run)
