"""Dollars per million samples of REW's designs, side by side: the one arithmetic behind
`refine --estimate_only` (prompt sizes measured on the input) and `pipelines.plan`
(prompt sizes assumed). No Beam.

Per sample, with `keep` = the share of samples whose verdict keeps the image (the rest
are dropped as not_an_entity or ungrounded) and I(side) = the image's tokens at a side:

  two requests   input  T_verify + I + keep x (T_rationale + I)     output O_v + keep x O_r
  one request    input  T_rew + I                                   output O_v + keep x O_r
  cascade        a self-hosted model answers every sample in one request (GPU $/h divided
                 by its requests per hour), `escalate_share` of them again at the API

The rationale is asked only for kept samples in both modes (refine never asks it for a
dropped one); what one request saves is the second request's image and instructions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Optional

# Output tokens of an answer (the planner's and the estimate's defaults): a verdict with its
# one-sentence reason, and a rationale of 1-3 sentences with 3-5 short QA pairs.
VERIFY_OUTPUT_TOKENS = 60
RATIONALE_OUTPUT_TOKENS = 350
DEFAULT_SELF_HOSTED_GPU = "H100-80GB"
# The legacy default of refine --max_image_side (before 2026-12): what "as refine sent" prices.
LEGACY_IMAGE_SIDE = 1024


@dataclasses.dataclass(frozen=True)
class Prices:
    """An API model's prices per million tokens, as the job pays them (`batch_factor` 1 online)."""

    model: str
    usd_in: float
    usd_out: float
    batch_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class SelfHosted:
    """A VLM on one GPU: its price per hour and the requests it answers per second."""

    gpu: str
    usd_per_hour: float
    requests_per_s: float
    source: str = "estimate"

    def usd_per_request(self) -> float:
        return self.usd_per_hour / (self.requests_per_s * 3600.0)


@dataclasses.dataclass(frozen=True)
class RewWorkload:
    verify_text: float  # text tokens of one verify request (prompt + caption + summary)
    rationale_text: float
    rew_text: float  # text tokens of the one-request prompt
    image_tokens: Callable[[int], float]  # mean image tokens of a sample sent at this longer side
    side: int  # the longer side refine sends (--max_image_side)
    cheapest_side: int  # the side where the token rule is cheapest for a readable image
    keep_share: float = 0.7
    verify_out: float = VERIFY_OUTPUT_TOKENS
    rationale_out: float = RATIONALE_OUTPUT_TOKENS


def _usd(prices: Prices, tokens_in: float, tokens_out: float) -> float:
    return (tokens_in * prices.usd_in + tokens_out * prices.usd_out) / 1e6 * prices.batch_factor


def designs(w: RewWorkload, prices: Prices, self_hosted: Optional[SelfHosted] = None,
            escalate_share: float = 0.15) -> list[dict]:
    """One row per design: requests, input and output tokens per sample, $ per 1M samples."""
    k = w.keep_share
    out = w.verify_out + k * w.rationale_out

    def two(side: int) -> tuple[float, float]:
        image = w.image_tokens(side)
        return w.verify_text + image + k * (w.rationale_text + image), out

    def one(side: int) -> tuple[float, float]:
        return w.rew_text + w.image_tokens(side), out

    rows = []

    def row(key: str, name: str, requests: float, tokens: tuple[float, float], note: str, usd: Optional[float] = None):
        tin, tout = tokens
        cost = _usd(prices, tin, tout) if usd is None else usd
        rows.append({"key": key, "design": name, "requests_per_sample": round(requests, 4), "input_tokens": round(tin, 1),
                     "output_tokens": round(tout, 1), "usd_per_million": round(cost * 1e6, 2), "note": note})

    row("today" if w.side != LEGACY_IMAGE_SIDE else "two", f"today's design (2 requests, {LEGACY_IMAGE_SIDE} px)", 1 + k, two(LEGACY_IMAGE_SIDE),
        f"verify for every sample, rationale + QA for the {k:.0%} kept, the image in both at refine's side before "
        f"this release; I = {w.image_tokens(LEGACY_IMAGE_SIDE):.0f} tokens")
    if w.side != LEGACY_IMAGE_SIDE:
        row("two", f"2 requests ({w.side} px)", 1 + k, two(w.side), f"the same at --max_image_side {w.side}; "
            f"I = {w.image_tokens(w.side):.0f} tokens")
    same_side = _usd(prices, *two(w.side))
    one_here = _usd(prices, *one(w.side))
    row("one", f"one request ({w.side} px)", 1, one(w.side),
        f"{same_side / one_here:.2f}x cheaper than 2 requests at {w.side} px: no second image and instructions, "
        "and a dropped sample's answer has no rationale")
    if w.cheapest_side != w.side:
        row("one_cheapest", f"one request ({w.cheapest_side} px)", 1, one(w.cheapest_side),
            f"the longer side where the provider's token rule is cheapest for a readable image: "
            f"I = {w.image_tokens(w.cheapest_side):.0f} tokens")
    if self_hosted is not None:
        api = _usd(prices, *one(w.cheapest_side))
        cost = self_hosted.usd_per_request() + escalate_share * api
        row("cascade", f"cascade ({self_hosted.gpu} first, {escalate_share:.0%} to {prices.model})", 1 + escalate_share,
            (escalate_share * one(w.cheapest_side)[0], escalate_share * out),
            f"self-hosted at ${self_hosted.usd_per_hour:g}/GPU-h and {self_hosted.requests_per_s:.1f} requests/s "
            f"({self_hosted.source}): ${self_hosted.usd_per_request() * 1e6:,.0f} per 1M; the escalated at "
            f"{w.cheapest_side} px in one request", usd=cost)
    base = rows[0]["usd_per_million"]
    for r in rows:
        r["x_cheaper_than_today"] = round(base / r["usd_per_million"], 2) if r["usd_per_million"] else None
    return rows


def render_designs(rows: list[dict], prices: Prices) -> list[str]:
    mode = "batch" if prices.batch_factor < 1 else "online"
    lines = [f"$ per 1M samples on {prices.model} ({mode}: ${prices.usd_in * prices.batch_factor:g} / "
             f"${prices.usd_out * prices.batch_factor:g} per M input / output tokens)"]
    width = max(len(r["design"]) for r in rows)
    lines.append(f"  {'design':<{width}}  {'req/sample':>10}  {'in tok':>8}  {'out tok':>8}  {'$ / 1M':>10}  {'vs today':>8}")
    for r in rows:
        lines.append(f"  {r['design']:<{width}}  {r['requests_per_sample']:>10.2f}  {r['input_tokens']:>8,.0f}  "
                     f"{r['output_tokens']:>8,.0f}  {'$' + format(r['usd_per_million'], ',.0f'):>10}  {r['x_cheaper_than_today']:>7.2f}x")
        lines.append(f"  {'':<{width}}    {r['note']}")
    return lines


def add_design_flags(p) -> None:
    """The settings of the designs table, the same in `refine --estimate_only` and `pipelines.plan`."""
    from transforms.llm.cost import MIN_READABLE_SIDE

    p.add_argument("--keep_share", type=float, default=0.7,
                   help="designs table: share of samples whose verdict keeps the image (only they get a rationale + QA)")
    p.add_argument("--min_readable_side", type=int, default=MIN_READABLE_SIDE,
                   help="designs table: the smallest longer side the cheapest-side design may send")
    p.add_argument("--escalate_share", type=float, default=0.15, help="designs table: cascade, share of samples escalated")
    p.add_argument("--self_hosted_gpu", default=None,
                   help="designs table: cascade, the GPU of the self-hosted model (plan_data/prices.json gpu_hour; "
                        f"default: the plan's --gpu, else {DEFAULT_SELF_HOSTED_GPU})")
    p.add_argument("--self_hosted_requests_per_s", type=float, default=0.0,
                   help="designs table: cascade, requests/s of the self-hosted model per GPU (default: plan_data/"
                        "throughputs.json vlm_7b_requests, scaled to REW's answer length)")


def check_design_flags(args) -> None:
    from transforms.errors import UsageError

    if not 0.0 <= args.keep_share <= 1.0:
        raise UsageError(f"--keep_share is a share in [0, 1], got {args.keep_share}")
    if not 0.0 <= args.escalate_share <= 1.0:
        raise UsageError(f"--escalate_share is a share in [0, 1], got {args.escalate_share}")
    if args.min_readable_side < 32:
        raise UsageError(f"--min_readable_side must be >= 32 px, got {args.min_readable_side}")
    if args.self_hosted_requests_per_s < 0:
        raise UsageError(f"--self_hosted_requests_per_s must be >= 0, got {args.self_hosted_requests_per_s}")


def self_hosted_from_data(gpu: Optional[str], requests_per_s: float, mean_output: float, prices: dict, rates: dict,
                          default_gpu: str = "") -> Optional[SelfHosted]:
    """The self-hosted model of the cascade: its GPU's price from `prices` (gpu_hour), its
    rate given or from `rates` (vlm_7b_requests, scaled to `mean_output`); None without a
    rate, or when no GPU was named and the default one has no price."""
    from transforms.errors import UsageError

    gpu_prices = prices.get("gpu_hour", {})
    if gpu is None:
        gpu = default_gpu or DEFAULT_SELF_HOSTED_GPU
        if gpu not in gpu_prices:
            return None
    if gpu not in gpu_prices:
        raise UsageError(f"--self_hosted_gpu {gpu!r} has no price in plan_data/prices.json gpu_hour; known: {', '.join(gpu_prices)}")
    if requests_per_s > 0:
        return SelfHosted(gpu, float(gpu_prices[gpu]), requests_per_s, "--self_hosted_requests_per_s")
    r = rates.get("vlm_7b_requests")
    if r is None:
        return None
    at = float(r.get("output_tokens", mean_output))
    rps = self_hosted_rate(float(r["rate"]), at, mean_output)
    return SelfHosted(gpu, float(gpu_prices[gpu]), rps, f"{r['source']}: {r['rate']:g}/s at {at:g} output tokens, scaled to {mean_output:.0f}")


def self_hosted_rate(published_rps: float, published_output_tokens: float, output_tokens: float) -> float:
    """Requests/s of a decode-bound server at another mean answer length: a published rate
    at `published_output_tokens` scaled by the ratio of output tokens (an estimate)."""
    return published_rps * published_output_tokens / max(output_tokens, 1.0)
