"""The `openai` backend against a loopback endpoint with a fixed latency: completed
requests/s vs the ideal `concurrency / latency`, and vs one request at a time.

    python benchmarks/refine_bench.py [--requests 1280] [--latency 0.2] [--concurrency 64]

The endpoint is tests/fake_llm_server.py (a real aiohttp server implementing the
chat-completions contract) answering every request after `--latency` seconds. Requests
are real verify prompts with a 64 x 48 JPEG as a base64 image part, sent through Beam
(`RunInference` with `OpenAICompatibleHandler`, DirectRunner), no cache; the server runs in
a process of its own. Reported for the whole run (Beam start-up included) and in steady
state (the marginal time from N to 2N requests). Goal: >= 0.9 of the ideal at concurrency 64.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def make_request(i: int):
    """The i-th verify request, built as refine builds it (prompt render, image attached)."""
    from prompts import load_prompt
    from tests.helpers import draw_image
    from transforms.schema import Sample
    from transforms.stages.refine import RequestSettings, verify_request

    global _PROMPT, _IMAGE
    if "_PROMPT" not in globals():
        _PROMPT, _IMAGE = load_prompt("verify"), draw_image(1)
    settings = RequestSettings("bench-vlm", "correct", "wiki_caption", {"temperature": 0.0, "max_tokens": 256})
    sample = Sample(key=f"k{i}", image=_IMAGE, image_format="jpg", caption=f"photo {i} of the tower", qid="Q243", title="Eiffel Tower")
    return verify_request((sample, "Wrought-iron lattice tower in Paris."), _PROMPT, settings)


def run_once(url: str, start: int, n: int, concurrency: int, processes: int = 1, **budget) -> float:
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.llm.client import OpenAICompatibleHandler

    handler = OpenAICompatibleHandler(
        url, max_concurrency=concurrency, cache_dir=budget.pop("cache_dir", None), batch_size=max(concurrency * 4, 16), max_retries=0, expected_processes=processes, **budget
    )
    flags = ["--runner=DirectRunner"]
    if processes > 1:
        flags += ["--direct_running_mode=multi_processing", f"--direct_num_workers={processes}"]
    started = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(flags)) as p:
        # As in refine: requests are built in the stage that sends them, never shuffled.
        # With several SDK processes the numbers are spread among them first.
        _ = p | beam.Create(range(start, start + n), reshuffle=processes > 1) | beam.Map(make_request) | RunInference(handler)
    return time.perf_counter() - started


def _serve(latency: float, urls, stop, counts, rate_limit: float = 0.0, rounds: int = 1) -> None:
    from tests.fake_llm_server import FakeLLMServer

    with FakeLLMServer(latency_s=latency, rate_limit_per_s=rate_limit) as server:
        urls.put(server.url)
        for _ in range(rounds):
            stop.wait()
            stop.clear()
            with server._lock:
                times = [t for t, _ in server.tokens_seen]
                counts.put((sum(server.answered.values()), server.rate_limited, times))
                server.answered.clear()
                server.tokens_seen.clear()
                server.rate_limited = 0
                server.answer_times.clear()


def _gcs_emulator(port, ready, stop) -> None:
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bench")
    server.start()
    ready.set()
    stop.wait()
    server.stop()


def cache_gcs(args) -> None:
    """The same requests with and without --cache on gs:// (a GCS emulator in a process of
    its own), then again from the now warm cache (compacted first, as refine does)."""
    import multiprocessing as mp
    import socket

    from apache_beam.internal.gcp import auth

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = mp.get_context("spawn")
    ready, stop_gcs = ctx.Event(), ctx.Event()
    gcs = ctx.Process(target=_gcs_emulator, args=(port, ready, stop_gcs), daemon=True)
    gcs.start()
    assert ready.wait(60)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    auth._Credentials._credentials_init, auth._Credentials._credentials = True, None  # anonymous, at once
    urls, counts, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(args.latency, urls, stop, counts, 0.0, 1), daemon=True)
    server.start()
    url = urls.get(timeout=60)
    n, c = args.requests, args.concurrency
    from transforms.llm.cache import compact

    try:
        run_once(url, 0, 64, c)  # warm-up: imports, connections
        t_none = run_once(url, 0, n, c)
        t_cold = run_once(url, n, n, c, cache_dir="gs://bench/cache")
        compacted = time.perf_counter()
        compact("gs://bench/cache")
        t_compact = time.perf_counter() - compacted
        t_warm = run_once(url, n, n, c, cache_dir="gs://bench/cache")
    finally:
        stop.set()
        stop_gcs.set()
    answered = counts.get(timeout=30)[0]
    server.join(30)
    gcs.join(30)
    assert answered == 64 + 2 * n, (answered, 64 + 2 * n)  # the warm run sent nothing
    print(f"{n} requests, latency {args.latency * 1000:.0f} ms, concurrency {c}, cache on the GCS emulator (whole Beam runs)")
    print(f"  no cache           {n / t_none:8.1f} requests/s  ({t_none:.1f} s)")
    print(f"  cache, cold        {n / t_cold:8.1f} requests/s  ({t_cold:.1f} s); ratio to no cache {t_none / t_cold:.3f}")
    print(f"  compaction         {t_compact:8.1f} s for {n} answers")
    print(f"  cache, warm        {n / t_warm:8.1f} requests/s  ({t_warm:.1f} s, nothing sent); ratio to no cache {t_none / t_warm:.3f}")


def rate_limited(args) -> None:
    """Two SDK processes against an endpoint that allows `--rate_limit` requests/s and
    answers 429 + Retry-After above it: without a configured rate (the slow-down
    controller alone) and with --max_requests_per_minute set to the server's limit."""
    import multiprocessing as mp
    import tempfile

    ctx = mp.get_context("spawn")
    urls, counts, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(args.latency, urls, stop, counts, args.rate_limit, 2), daemon=True)
    server.start()
    url = urls.get(timeout=60)
    n = args.requests
    print(f"{n} requests, 2 SDK processes, server limit {args.rate_limit:g} requests/s (429 + Retry-After above it), "
          f"latency {args.latency * 1000:.0f} ms, --max_concurrency {args.concurrency}")
    runs = (
        ("slow-down controller only", {}),
        (f"--max_requests_per_minute {60 * args.rate_limit:g}", {"requests_per_minute": 60 * args.rate_limit}),
    )
    for i, (name, budget) in enumerate(runs):
        with tempfile.TemporaryDirectory() as tmp:
            seconds = run_once(url, i * n, n, args.concurrency, processes=2, budget_dir=tmp, budget_refresh_s=1.0, **budget)
        stop.set()
        answered, limited, times = counts.get(timeout=60)
        assert answered == n, (answered, n)
        times.sort()
        # The rate the endpoint answered at while the job was sending (Beam start-up excluded).
        span = times[-1] - times[0]
        rate = (len(times) - 1) / span if span > 0 else float("nan")
        print(f"  {name:<36} answered {rate:6.2f}/s = {rate / args.rate_limit:.3f} of the limit; "
              f"429s {limited} ({limited / answered:.3f} per answer); whole run {seconds:.1f} s")
    server.join(30)


def main(argv=None):
    import multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1280)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--scenario", choices=("latency", "rate_limited", "cache_gcs"), default="latency")
    ap.add_argument("--rate_limit", type=float, default=8.0, help="rate_limited: requests/s the server allows")
    args = ap.parse_args(argv)
    if args.scenario == "rate_limited":
        return rate_limited(args)
    if args.scenario == "cache_gcs":
        return cache_gcs(args)
    n = args.requests
    serial_n = max(10, int(5 / args.latency))
    # The endpoint runs in a process of its own, as a real server would: its CPU and GIL
    # are not ours to measure.
    ctx = mp.get_context("spawn")
    urls, counts, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(args.latency, urls, stop, counts), daemon=True)
    server.start()
    try:
        url = urls.get(timeout=60)
        t_conc = run_once(url, 0, n, args.concurrency)
        t_conc2 = run_once(url, n, 2 * n, args.concurrency)
        t_one = run_once(url, 3 * n, serial_n, 1)
    finally:
        stop.set()
    answered = counts.get(timeout=30)[0]  # (answered, rate-limited, answer times)
    server.join(30)
    assert answered == 3 * n + serial_n, (answered, 3 * n + serial_n)
    ideal = args.concurrency / args.latency
    rate = n / t_conc
    rate_one = serial_n / t_one
    print(f"{n} requests, latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency} (whole Beam run, start-up included)")
    print(f"  completed          {rate:8.1f} requests/s  ({t_conc:.1f} s)")
    print(f"  ideal c / latency  {ideal:8.1f} requests/s")
    print(f"  ratio to ideal     {rate / ideal:8.3f}")
    steady = n / (t_conc2 - t_conc)
    print(f"  steady state       {steady:8.1f} requests/s  ((t(2N) - t(N)) / N: Beam start-up cancelled); ratio to ideal {steady / ideal:.3f}")
    print(f"  one at a time      {rate_one:8.1f} requests/s  ({serial_n} requests, {t_one:.1f} s); speed-up {rate / rate_one:.1f}x")


if __name__ == "__main__":
    main()
