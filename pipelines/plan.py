"""What a whole job will take before it starts: work, time, dollars and physical limit per stage.

    python -m pipelines.plan --entities 6063945 --captions 2.3e9 --k 100 --images 50e6 \\
        --llm gpt-4.1-mini [--workers 100 --cpu_machine n2-standard-4] [--gpu H100-80GB --gpus 8] [--json]
    python -m pipelines.plan --recipe recipes/entity_laion.yaml --entities 6063945 --captions 2.3e9

For each stage (build the entity index, select captions, download the selected images,
decontaminate, refine with an LLM, train) it prints the work (items, FLOPs, bytes read and
shuffled, requests and tokens), the time on the named hardware, the cost at the stated
prices, and the stage's floor on that hardware: the time it would take at the machines'
peak FLOP/s, memory bandwidth or network, whichever binds, and the share of that peak the
stage runs at. Stages run one after another; the totals add them up.

Where the numbers come from (all files the user can edit or replace by flag):
* `plan_data/throughputs.json` - rates measured by this repository's benchmarks (`ours`,
  with command, hardware and date), by the team, or estimated from FLOPs (`estimate`);
* `plan_data/hardware.json` - peak FLOP/s, memory bandwidth and network of CPU machine
  types and GPUs, with sources;
* `plan_data/prices.json` - Dataflow, GPU and LLM prices.
The plan prints every assumption it used, so a number that matters can be checked or
overridden.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transforms.errors import UsageError
from transforms.llm.cost import cheapest_readable_side, image_tokens
from transforms.llm.rew_cost import (
    RATIONALE_OUTPUT_TOKENS,
    VERIFY_OUTPUT_TOKENS,
    Prices,
    RewWorkload,
    SelfHosted,
    add_design_flags,
    check_design_flags,
    designs,
    render_designs,
    self_hosted_from_data,
)
from transforms.run.cli import Parser, exit_code

REW_DESIGNS = ("two", "one", "one_cheapest", "cascade")

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_data")

# Model sizes (parameters that cost FLOPs: the embedding tables do not) and per-item token
# counts: forward FLOPs are ~2 x parameters x tokens, training ~6 x.
MINILM_PARAMS = 10.6e6  # all-MiniLM-L6-v2: 6 layers x (4 x 384^2 + 2 x 384 x 1536); 22.7M with embeddings
CLIP_VIT_L14_PARAMS = 304e6  # image tower
CLIP_VIT_L14_TOKENS = 257  # 224 px / 14 = 16 x 16 patches + class token
CLIP_VIT_S32_FLOPS = 2 * 22e6 * 50  # the CPU-measured model: 224 / 32 = 7 x 7 patches + 1
GIT_LARGE_PARAMS = 394e6
GIT_TOKENS = 257 + 40  # image tokens + caption/code tokens
DIM = 384


@dataclass
class Stage:
    name: str
    work: dict
    hardware: str
    seconds: float
    dollars: float
    limit: dict
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "work": self.work, "hardware": self.hardware, "seconds": self.seconds,
                "dollars": self.dollars, "limit": self.limit, "notes": self.notes}


def load(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise UsageError(f"--{what}: {path} does not exist; give a JSON file shaped like {os.path.join(DATA, what + '.json')}") from e
    except json.JSONDecodeError as e:
        raise UsageError(f"--{what}: {path} is not valid JSON ({e})") from e


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.recipe:
        given = {a.split("=", 1)[0][2:] for a in argv if a.startswith("--")}
        for key, value in recipe_settings(args.recipe).items():
            if key not in given:
                setattr(args, key, value)
    return args


def recipe_settings(path: str) -> dict:
    """The plan's settings a recipe decides: select_candidates' k and M, refine's model,
    backend, requests per sample, image side and cascade, whether it trains. A flag given
    on the command line wins over the recipe."""
    from transforms.run.recipe import load, parsed_options

    r = load(path, output="PLAN", data="DATA")
    found: dict = {"llm": "none", "train_epochs": 0.0}
    for stage in r.stages:
        if not stage.command:
            continue
        o = parsed_options(stage)
        if stage.command == "select_candidates":
            found.update(k=o["k"], per_caption_entities=o["per_caption_entities"])
        elif stage.command == "refine":
            found.update(llm=o["model"], image_side=o["max_image_side"] or 1024,
                         llm_backend="batch" if o["llm_backend"] in ("openai_batch", "vertex_batch") else "online",
                         requests_per_sample=float(o["rew_requests"]))
            if o.get("escalate_backend"):
                found["rew_design"] = "cascade"
        elif stage.command == "trainer.train":
            found["train_epochs"] = 1.0
    return found


def build_parser() -> Parser:
    p = Parser("pipelines.plan", __doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=None,
                   help="a pipelines.run recipe: its settings (k, M, the LLM, its backend, requests per sample, image side, "
                        "cascade, training) replace the defaults; flags given here still win")
    p.add_argument("--entities", type=float, required=True, help="catalog size (OVEN/Wiki6M: 6063945)")
    p.add_argument("--captions", type=float, required=True, help="caption corpus size (LAION-2B-en: 2.3e9)")
    p.add_argument("--k", type=int, default=100, help="images kept per entity (select_candidates --k)")
    p.add_argument("--images", type=float, default=0,
                   help="images selected, downloaded, decontaminated and refined (default: entities x k, "
                        "an upper bound: most entities find fewer)")
    p.add_argument("--per_caption_entities", type=int, default=5, help="M of select_candidates")
    p.add_argument("--proposal_share", type=float, default=0.05,
                   help="share of captions with at least one entity above --min_score (assumption)")
    p.add_argument("--nlist", type=int, default=0,
                   help="IVF lists of the entity index (default: the power of two at or above 4 x sqrt(entities))")
    p.add_argument("--nprobe", type=int, default=64, help="IVF lists searched per caption (build_entity_index calibrates it)")
    p.add_argument("--index_codes", choices=("sq8", "flat"), default="sq8",
                   help="how the index stores its vectors: IVF<nlist>,SQ8 (the recommended index, 1 byte a dimension) "
                        "or IVF<nlist>,Flat (4 bytes)")
    p.add_argument("--title_tokens", type=float, default=8.0, help="mean tokens per entity title")
    p.add_argument("--caption_tokens", type=float, default=18.0, help="mean tokens per caption (alt-texts: ~60 characters)")
    p.add_argument("--caption_row_bytes", type=float, default=100.0, help="bytes of caption metadata read per caption")
    p.add_argument("--entity_row_bytes", type=float, default=1000.0, help="bytes read per catalog row (title, summary, fields)")
    p.add_argument("--image_bytes", type=float, default=50e3, help="mean bytes of a downloaded image")
    p.add_argument("--draft_decode", choices=("yes", "no"), default="yes", help="reduced-scale JPEG decode for CLIP")
    p.add_argument("--llm", default="gpt-4.1-mini", help="a model in prices.json llm_per_million_tokens, or 'none'")
    p.add_argument("--llm_backend", choices=("online", "batch"), default="batch", help="price and time of refine's LLM calls")
    p.add_argument("--requests_per_sample", type=float, default=2.0,
                   help="2: verify, then rationale + QA for the kept samples (refine's default); 1: one request per "
                        "sample (refine --rew_requests 1)")
    p.add_argument("--rew_design", choices=REW_DESIGNS, default=None,
                   help="the REW design the refine stage is priced at (default: two or one, from --requests_per_sample); "
                        "every design is listed side by side either way")
    p.add_argument("--prompt_tokens", type=float, default=400.0,
                   help="text tokens of a verify request (its instructions ~305 + caption, title and summary); the "
                        "rationale and one-request prompts carry the same data with their own instructions")
    p.add_argument("--output_tokens", type=float, default=None,
                   help="mean output tokens of every answer (default: 60 for a verdict, 350 for a rationale + QA)")
    p.add_argument("--image_side", type=int, default=512, help="longest side images are sent at (refine --max_image_side)")
    add_design_flags(p)
    p.add_argument("--llm_rpm", type=float, default=30000.0, help="requests per minute the provider allows the job")
    p.add_argument("--train_epochs", type=float, default=1.0, help="0: no training stage")
    p.add_argument("--workers", type=int, default=100, help="Dataflow workers for the CPU stages")
    p.add_argument("--cpu_machine", default="n2-standard-4", help="Dataflow worker type of the CPU stages (hardware.json)")
    p.add_argument("--gpu", default="H100-80GB", help="GPU for decontamination and training, or 'none' (CPU workers)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of decontamination and training")
    p.add_argument("--gpu_utilisation", type=float, default=0.0, help="model FLOP utilisation (default: throughputs.json)")
    p.add_argument("--throughputs", default=os.path.join(DATA, "throughputs.json"), help="measured rates (JSON)")
    p.add_argument("--hardware", default=os.path.join(DATA, "hardware.json"), help="machine types and their limits (JSON)")
    p.add_argument("--prices", default=os.path.join(DATA, "prices.json"), help="prices to edit (JSON)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


class Planner:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.rates = load(args.throughputs, "throughputs")
        self.hw = load(args.hardware, "hardware")
        self.prices = load(args.prices, "prices")
        for name, flag in ((args.cpu_machine, "--cpu_machine"), (args.gpu, "--gpu")):
            if name != "none" and name not in self.hw:
                known = ", ".join(k for k in self.hw if not k.startswith("_"))
                raise UsageError(f"{flag} {name!r} is not in {args.hardware}; known: {known} (or add it there)")
        if self.hw[args.cpu_machine]["kind"] != "cpu":
            raise UsageError(f"--cpu_machine {args.cpu_machine!r} is a GPU; give a CPU machine type")
        if args.gpu != "none" and self.hw[args.gpu]["kind"] != "gpu":
            raise UsageError(f"--gpu {args.gpu!r} is not a GPU")
        if args.llm != "none" and args.llm not in self.prices.get("llm_per_million_tokens", {}):
            known = ", ".join(self.prices.get("llm_per_million_tokens", {}))
            raise UsageError(f"--llm {args.llm!r} has no price in {args.prices}; known: {known} (or add it, or --llm none)")
        check_design_flags(args)
        for name in ("workers", "gpus", "k"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name} must be >= 1")
        if args.entities < 1 or args.captions < 1:
            raise UsageError("--entities and --captions must be >= 1")
        self.cpu = self.hw[args.cpu_machine]
        self.vcpus = self.cpu["vcpus"] * args.workers
        self.images = args.images or args.entities * args.k
        self.mfu = args.gpu_utilisation or self.rates["gpu_utilisation"]["rate"]
        self.used: dict[str, str] = {}

    # -- helpers --------------------------------------------------------------------------
    def rate(self, key: str) -> float:
        if key not in self.rates:
            raise UsageError(f"--throughputs {self.a.throughputs}: no entry {key!r} (copy it from the bundled "
                             f"pipelines/plan_data/throughputs.json)")
        r = self.rates[key]
        self.used[key] = f"{r['rate']:g} {r['unit']} per {r['per']} ({r['source']}, {r['hardware']}, {r['date']}: {r['command']})"
        return float(r["rate"])

    def cpu_dollars(self, seconds: float, shuffle_bytes: float = 0.0) -> float:
        d = self.prices["dataflow"]
        per_worker_hour = self.cpu["vcpus"] * d["vcpu_hour"] + self.cpu["memory_gb"] * d["memory_gb_hour"]
        return seconds / 3600 * per_worker_hour * self.a.workers + shuffle_bytes / 1e9 * d["shuffle_gb"]

    def cpu_limit(self, flops: float, read: float, seconds: float) -> dict:
        machines = self.a.workers
        compute = flops / (self.cpu["peak_flops"] * machines)
        network = read * 8 / (self.cpu["network_gbps"] * 1e9 * machines)
        floor = max(compute, network)
        return {"bound": "compute" if compute >= network else "network", "seconds": floor,
                "share_of_peak": floor / seconds if seconds else 0.0}

    def cpu_hw(self) -> str:
        return f"{self.a.workers} x {self.a.cpu_machine}"

    # -- stages ---------------------------------------------------------------------------
    def entity_index(self) -> Stage:
        a = self.a
        n = a.entities
        flops = n * a.title_tokens * 2 * MINILM_PARAMS
        read, shuffle = n * a.entity_row_bytes, n * a.entity_row_bytes
        seconds = n / (self.rate("text_encoder_titles") * self.vcpus)
        work = {"items": n, "unit": "entities", "flops": flops, "bytes_read": read, "bytes_shuffled": shuffle}
        return Stage("build_entity_index", work, self.cpu_hw(), seconds, self.cpu_dollars(seconds, shuffle),
                     self.cpu_limit(flops, read, seconds))

    def nlist(self) -> int:
        return self.a.nlist or 2 ** max(0, math.ceil(math.log2(4 * math.sqrt(self.a.entities))))

    def select(self) -> Stage:
        a = self.a
        c = a.captions
        nlist = self.nlist()
        scanned = nlist + min(a.nprobe, nlist) * a.entities / nlist
        encode_s = c / (self.rate("select_captions") * self.vcpus)
        scan_rate = "ivf_scan_sq8" if a.index_codes == "sq8" else "ivf_scan"
        search_s = c * scanned / (self.rate(scan_rate) * self.vcpus)
        seconds = encode_s + search_s
        flops = c * a.caption_tokens * 2 * MINILM_PARAMS + c * scanned * 2 * DIM
        read = c * a.caption_row_bytes
        proposals = c * a.proposal_share * a.per_caption_entities
        # The top-K combiner is lifted: what crosses the shuffle is at most each worker's
        # partial top-K (8-way hot-key fan-out), never more than the proposals themselves.
        combined = min(proposals, a.entities * a.k * 8)
        shuffle = combined * 120 + self.images * 300  # proposals, then kept candidates grouped by file
        work = {"items": c, "unit": "captions", "flops": flops, "bytes_read": read, "bytes_shuffled": shuffle,
                "proposals": proposals, "vectors_scanned_per_caption": scanned}
        notes = [f"IVF{nlist},{'SQ8' if a.index_codes == 'sq8' else 'Flat'} nprobe {a.nprobe}: {scanned:,.0f} vectors "
                 "scanned per caption; "
                 f"encoding {encode_s / seconds:.0%} of the time, search {search_s / seconds:.0%}"]
        return Stage("select_candidates", work, self.cpu_hw(), seconds, self.cpu_dollars(seconds, shuffle),
                     self.cpu_limit(flops, read, seconds), notes)

    def download(self) -> Stage:
        n = self.images
        read = n * self.a.image_bytes
        seconds = n / (self.rate("image_download") * self.vcpus)
        work = {"items": n, "unit": "images", "flops": 0.0, "bytes_read": read, "bytes_shuffled": 0.0}
        limit = self.cpu_limit(0.0, read, seconds)
        return Stage("download_images", work, self.cpu_hw(), seconds, self.cpu_dollars(seconds), limit,
                     ["outside entityforge (img2dataset or similar), listed for the whole job's cost"])

    def decontaminate(self) -> Stage:
        a = self.a
        n = self.images
        flops_per = 2 * CLIP_VIT_L14_PARAMS * CLIP_VIT_L14_TOKENS
        flops = n * flops_per
        read = n * a.image_bytes
        decode = self.rate("jpeg_decode_draft" if a.draft_decode == "yes" else "jpeg_decode_full")
        work = {"items": n, "unit": "images", "flops": flops, "bytes_read": read, "bytes_shuffled": 0.0}
        if a.gpu == "none":
            per_vcpu = 1 / (1 / self.rate("clip_vit_s32_cpu") * flops_per / CLIP_VIT_S32_FLOPS)
            seconds = n / (per_vcpu * self.vcpus)
            return Stage("decontaminate", work, self.cpu_hw(), seconds, self.cpu_dollars(seconds),
                         self.cpu_limit(flops, read, seconds),
                         ["ViT-L/14 on CPU: the measured ViT-S/32 rate scaled by FLOPs"])
        g = self.hw[a.gpu]
        gpu_rate = g["peak_flops"] * self.mfu / flops_per
        host_rate = decode * g["host_vcpus"]
        rate = min(gpu_rate, host_rate)
        seconds = n / (rate * a.gpus)
        dollars = seconds / 3600 * self.prices["gpu_hour"][a.gpu] * a.gpus
        compute = flops / (g["peak_flops"] * a.gpus)
        network = read * 8 / (g["network_gbps"] * 1e9 * a.gpus)
        floor = max(compute, network)
        limit = {"bound": "compute" if compute >= network else "network", "seconds": floor, "share_of_peak": floor / seconds}
        notes = [f"per GPU: {gpu_rate:,.0f} images/s on the GPU (estimate at {self.mfu:.0%} of peak), "
                 f"{host_rate:,.0f} images/s of JPEG decode on {g['host_vcpus']} host vCPUs: "
                 + ("decode is the limit" if host_rate < gpu_rate else "the GPU is the limit")]
        self.used["gpu_utilisation"] = f"{self.mfu:g} of peak FLOP/s (estimate; --gpu_utilisation)"
        return Stage("decontaminate", work, f"{a.gpus} x {a.gpu}", seconds, dollars, limit, notes)

    def rew_designs(self) -> tuple[list[dict], Prices]:
        """REW's designs in $ per 1M samples (transforms/llm/rew_cost.py), at this plan's settings."""
        a = self.a
        price = self.prices["llm_per_million_tokens"][a.llm]
        rule = price.get("image_tokens", "openai")
        factor = price.get("batch_factor", 0.5) if a.llm_backend == "batch" else 1.0
        prices = Prices(a.llm, price["input"], price["output"], factor)
        static = prompt_instruction_tokens()
        data = max(0.0, a.prompt_tokens - static["verify"])  # caption, title and summary
        out_v = a.output_tokens if a.output_tokens is not None else VERIFY_OUTPUT_TOKENS
        out_r = a.output_tokens if a.output_tokens is not None else RATIONALE_OUTPUT_TOKENS
        w = RewWorkload(
            verify_text=a.prompt_tokens, rationale_text=static["rationale_qa"] + data, rew_text=static["rew"] + data,
            image_tokens=lambda side: image_tokens(side, side, rule), side=a.image_side,
            cheapest_side=cheapest_readable_side(rule, a.min_readable_side), keep_share=a.keep_share,
            verify_out=out_v, rationale_out=out_r,
        )
        self.used["rew_prompts"] = (f"instructions of verify / rationale_qa / rew: {static['verify']:.0f} / "
                                    f"{static['rationale_qa']:.0f} / {static['rew']:.0f} tokens (prompts/), plus "
                                    f"{data:.0f} tokens of caption, title and summary")
        return designs(w, prices, self.self_hosted(out_v + a.keep_share * out_r), a.escalate_share), prices

    def self_hosted(self, mean_output: float) -> Optional[SelfHosted]:
        a = self.a
        if a.self_hosted_requests_per_s <= 0 and "vlm_7b_requests" in self.rates:
            self.rate("vlm_7b_requests")  # listed under "rates used"
        return self_hosted_from_data(a.self_hosted_gpu, a.self_hosted_requests_per_s, mean_output, self.prices, self.rates,
                                     default_gpu=a.gpu if a.gpu != "none" else "")

    def refine(self) -> Optional[Stage]:
        a = self.a
        if a.llm == "none":
            return None
        rows, prices = self.rew_designs()
        self.designs, self.rew_prices = rows, dataclasses.asdict(prices)
        choice = a.rew_design or ("two" if a.requests_per_sample >= 2 else "one")
        by_key = {r["key"]: r for r in rows}
        by_key.setdefault("one_cheapest", by_key["one"])  # the side asked is already the cheapest
        matching = [by_key[choice]] if choice in by_key else []
        if not matching:
            raise UsageError("--rew_design cascade needs a self-hosted rate: --self_hosted_requests_per_s or "
                             "vlm_7b_requests in --throughputs")
        row = matching[0]
        n = self.images
        requests = n * row["requests_per_sample"]
        tokens_in, tokens_out = n * row["input_tokens"], n * row["output_tokens"]
        dollars = n * row["usd_per_million"] / 1e6
        api_requests = requests if choice != "cascade" else n * a.escalate_share
        seconds = api_requests / (a.llm_rpm / 60)
        if choice == "cascade":
            sh = self.self_hosted(0)  # its rate is only for the time: cost is in the row
            seconds = max(seconds, n / (sh.requests_per_s * a.gpus)) if sh else seconds
        price = self.prices["llm_per_million_tokens"][a.llm]
        rule = price.get("image_tokens", "openai")
        w = a.image_side if choice in ("two", "one") else cheapest_readable_side(rule, a.min_readable_side)
        work = {"items": n, "unit": "samples", "requests": requests, "input_tokens": tokens_in, "output_tokens": tokens_out,
                "image_tokens_per_request": image_tokens(w, w, rule), "flops": 0.0,
                "bytes_read": n * a.image_bytes, "bytes_shuffled": n * 1000.0}
        limit = {"bound": "provider rate limit", "seconds": seconds, "share_of_peak": 1.0}
        notes = [f"design: {row['design']}, ${row['usd_per_million']:,.0f} per 1M samples ({prices.model} "
                 f"{a.llm_backend}, x{prices.batch_factor:g} of online prices)",
                 f"time at --llm_rpm {a.llm_rpm:g}; batch APIs return within 24 h per batch"]
        return Stage("refine", work, f"{a.llm} {a.llm_backend}", seconds, dollars, limit, notes)

    def train(self) -> Optional[Stage]:
        a = self.a
        if a.train_epochs <= 0 or a.gpu == "none":
            return None
        samples = self.images * a.train_epochs
        flops_per = 6 * GIT_LARGE_PARAMS * GIT_TOKENS
        g = self.hw[a.gpu]
        rate = g["peak_flops"] * self.mfu / flops_per
        seconds = samples / (rate * a.gpus)
        dollars = seconds / 3600 * self.prices["gpu_hour"][a.gpu] * a.gpus
        floor = samples * flops_per / (g["peak_flops"] * a.gpus)
        work = {"items": samples, "unit": "samples", "flops": samples * flops_per, "bytes_read": samples * a.image_bytes,
                "bytes_shuffled": 0.0}
        self.used["gpu_utilisation"] = f"{self.mfu:g} of peak FLOP/s (estimate; --gpu_utilisation)"
        return Stage("train", work, f"{a.gpus} x {a.gpu}", seconds, dollars,
                     {"bound": "compute", "seconds": floor, "share_of_peak": floor / seconds},
                     [f"GIT-large, {a.train_epochs:g} epoch(s), {rate:,.0f} samples/s per GPU (estimate)"])

    def plan(self) -> dict:
        self.designs, self.rew_prices = [], None
        stages = [s for s in (self.entity_index(), self.select(), self.download(), self.decontaminate(),
                              self.refine(), self.train()) if s is not None]
        return {
            "inputs": {k: v for k, v in vars(self.a).items() if k not in ("json",)},
            "stages": [s.to_json() for s in stages],
            "totals": {"seconds": sum(s.seconds for s in stages), "dollars": sum(s.dollars for s in stages)},
            "rew_designs": self.designs,
            "rew_prices": self.rew_prices,
            "assumptions": dict(self.used),
        }


def prompt_instruction_tokens() -> dict[str, float]:
    """Text tokens of each REW prompt without its data (caption, title, summary empty)."""
    from prompts import load_prompt, render_rationale_qa, render_verify, split_image
    from transforms.llm.cost import text_tokens

    out = {}
    for task in ("verify", "rationale_qa", "rew"):
        p = load_prompt(task)
        if task == "rationale_qa":
            text = render_rationale_qa(p, entity="", summary="", caption="", context="wiki_caption")
        else:
            text = render_verify(p, caption="", title="", summary="", mode="correct", context="wiki_caption")
        out[task] = float(text_tokens("".join(split_image(text))))
    return out


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def render(plan: dict) -> str:
    a = plan["inputs"]
    lines = [f"plan: {a['entities']:,.0f} entities x {a['captions']:,.0f} captions, k={a['k']}, "
             f"LLM {a['llm']} ({a['llm_backend']})", ""]
    lines.append(f"{'stage':<19} {'work':<58} {'hardware':<22} {'time':>7} {'dollars':>9}  floor (bound, share of peak)")
    for s in plan["stages"]:
        w = s["work"]
        work = f"{si(w['items'])} {w['unit']}"
        if w.get("flops"):
            work += f", {si(w['flops'])}FLOP"
        if w.get("requests"):
            work += f", {si(w['requests'])} req, {si(w['input_tokens'] + w['output_tokens'])} tok"
        work += f", read {si(w['bytes_read'])}B"
        if w.get("bytes_shuffled"):
            work += f", shuffle {si(w['bytes_shuffled'])}B"
        lim = s["limit"]
        lines.append(f"{s['name']:<19} {work:<58} {s['hardware']:<22} {human_seconds(s['seconds']):>7} "
                     f"{'$' + format(s['dollars'], ',.0f'):>9}  {human_seconds(lim['seconds'])} ({lim['bound']}, "
                     f"{lim['share_of_peak']:.0%})")
        for n in s["notes"]:
            lines.append(f"{'':<19} - {n}")
    t = plan["totals"]
    lines.append(f"{'total':<19} {'':<58} {'':<22} {human_seconds(t['seconds']):>7} {'$' + format(t['dollars'], ',.0f'):>9}")
    lines.append("")
    if plan.get("rew_designs"):
        prices = plan["rew_prices"]
        lines += ["REW designs, " + line if i == 0 else line
                  for i, line in enumerate(render_designs(plan["rew_designs"], Prices(**prices)))]
        lines.append("")
    lines.append("rates used:")
    for k, v in plan["assumptions"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def run(argv=None) -> dict:
    args = parse_args(argv)
    plan = Planner(args).plan()
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return plan


def main(argv=None) -> int:
    return exit_code(run, argv)


if __name__ == "__main__":
    sys.exit(main())
