"""pipelines.plan on small inputs with round-number data files: every figure checked
against a computation by hand."""

import json

import pytest

from pipelines import plan
from transforms.errors import UsageError


@pytest.fixture
def data(tmp_path):
    hardware = {
        "m": {"kind": "cpu", "vcpus": 2, "memory_gb": 4, "peak_flops": 1e9, "mem_bw_gbs": 1, "network_gbps": 8},
        "g": {"kind": "gpu", "peak_flops": 1e12, "mem_bw_gbs": 100, "memory_gb": 16, "host_vcpus": 4, "network_gbps": 8},
    }
    rate = lambda r, unit="items/s", per="vcpu": {"rate": r, "unit": unit, "per": per, "hardware": "h", "date": "d",  # noqa: E731
                                                  "source": "ours", "command": "c"}
    throughputs = {
        "text_encoder_titles": rate(10), "select_captions": rate(5), "ivf_scan": rate(1000), "ivf_scan_sq8": rate(2000),
        "jpeg_decode_draft": rate(50),
        "jpeg_decode_full": rate(25), "clip_vit_s32_cpu": rate(1), "image_download": rate(2), "gpu_utilisation": rate(0.5, per="gpu"),
    }
    prices = {
        "dataflow": {"vcpu_hour": 1.0, "memory_gb_hour": 0.5, "shuffle_gb": 2.0},
        "gpu_hour": {"g": 3.6},
        "llm_per_million_tokens": {"m1": {"input": 1.0, "output": 2.0, "image_tokens": "openai", "batch_factor": 0.5}},
    }
    paths = {}
    for name, obj in (("hardware", hardware), ("throughputs", throughputs), ("prices", prices)):
        paths[name] = str(tmp_path / f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(obj, f)
    return ["--hardware", paths["hardware"], "--throughputs", paths["throughputs"], "--prices", paths["prices"],
            "--cpu_machine", "m", "--gpu", "g", "--gpus", "2", "--workers", "3", "--llm", "m1", "--llm_rpm", "30000",
            "--entities", "100", "--captions", "1000", "--k", "2", "--nlist", "10", "--nprobe", "2"]


def test_plan_arithmetic_matches_a_hand_computation(data, capsys):
    p = plan.run(data)
    stages = {s["name"]: s for s in p["stages"]}
    assert list(stages) == ["build_entity_index", "select_candidates", "download_images", "decontaminate", "refine", "train"]
    worker_hour = 2 * 1.0 + 4 * 0.5  # $ per worker-hour: vCPUs and memory at Dataflow rates

    # 100 titles at 10/s per vCPU on 3 workers x 2 vCPUs; 8 tokens x 2 x 10.6M FLOPs each.
    ix = stages["build_entity_index"]
    assert ix["seconds"] == pytest.approx(100 / 60)
    assert ix["work"]["flops"] == pytest.approx(100 * 8 * 2 * 10.6e6)
    assert ix["dollars"] == pytest.approx(100 / 60 / 3600 * worker_hour * 3 + 100 * 1000 / 1e9 * 2.0)
    floor = 100 * 8 * 2 * 10.6e6 / (1e9 * 3)
    assert ix["limit"]["bound"] == "compute" and ix["limit"]["seconds"] == pytest.approx(floor)
    assert ix["limit"]["share_of_peak"] == pytest.approx(floor / (100 / 60))

    # IVF10 with nprobe 2 over 100 entities: 10 centroids + 2 lists of 10 = 30 vectors a caption,
    # scanned at the SQ8 rate (the default codes), or the Flat one.
    sel = stages["select_candidates"]
    assert sel["work"]["vectors_scanned_per_caption"] == pytest.approx(30)
    assert sel["seconds"] == pytest.approx(1000 / (5 * 6) + 1000 * 30 / (2000 * 6))
    flat = {s["name"]: s for s in plan.run([*data, "--index_codes", "flat"])["stages"]}["select_candidates"]
    assert flat["seconds"] == pytest.approx(1000 / (5 * 6) + 1000 * 30 / (1000 * 6))
    assert "IVF10,Flat" in flat["notes"][0] and "IVF10,SQ8" in sel["notes"][0]
    assert sel["work"]["flops"] == pytest.approx(1000 * 18 * 2 * 10.6e6 + 1000 * 30 * 2 * 384)
    # Proposals: 5 % of captions x M=5 = 250 (under the combiner's bound); 200 kept images.
    assert sel["work"]["bytes_shuffled"] == pytest.approx(250 * 120 + 200 * 300)

    # 200 images (100 entities x k=2); ViT-L/14 at 2 x 304M x 257 FLOPs; the GPU at 50 % of
    # 1 TFLOP/s does 3.2 images/s, decode on 4 host vCPUs 200/s: the GPU is the limit.
    dec = stages["decontaminate"]
    per_gpu = 1e12 * 0.5 / (2 * 304e6 * 257)
    assert dec["seconds"] == pytest.approx(200 / (per_gpu * 2))
    assert dec["dollars"] == pytest.approx(dec["seconds"] / 3600 * 3.6 * 2)
    assert "the GPU is the limit" in dec["notes"][0]

    # Two requests (refine's default): verify for all 200 samples (400 text + 255 image tokens:
    # 512 px, OpenAI tiles), rationale + QA for the 70 % kept (the rationale prompt's own
    # instructions + the same data, and the image again); 60 + 0.7 x 350 tokens out; batch x0.5.
    ref = stages["refine"]
    static = plan.prompt_instruction_tokens()
    rationale_text = static["rationale_qa"] + (400 - static["verify"])
    per_sample_in = 400 + 255 + 0.7 * (rationale_text + 255)
    assert ref["work"]["image_tokens_per_request"] == 255
    assert ref["work"]["requests"] == pytest.approx(200 * 1.7)
    assert ref["work"]["input_tokens"] == pytest.approx(200 * per_sample_in)
    assert ref["dollars"] == pytest.approx(200 * (per_sample_in * 1.0 + 305 * 2.0) / 1e6 * 0.5)
    assert ref["seconds"] == pytest.approx(340 / 500)
    # The designs side by side, in $ per 1M samples: one request drops the second image and
    # instructions; the legacy 1024 px design (tiles: shorter side 768, 4 tiles = 765 tokens).
    rows = {r["key"]: r for r in p["rew_designs"]}
    assert list(rows) == ["today", "two", "one"]  # 512 px is already the cheapest readable side for tiles
    one_in = static["rew"] + (400 - static["verify"]) + 255
    assert rows["one"]["usd_per_million"] == pytest.approx((one_in * 1.0 + 305 * 2.0) * 0.5, abs=0.01)
    today_in = 400 + 765 + 0.7 * (rationale_text + 765)
    assert rows["today"]["usd_per_million"] == pytest.approx((today_in * 1.0 + 305 * 2.0) * 0.5, abs=0.01)
    assert rows["two"]["usd_per_million"] == pytest.approx(ref["dollars"] / 200 * 1e6, abs=0.01)

    tr = stages["train"]
    assert tr["seconds"] == pytest.approx(200 / (1e12 * 0.5 / (6 * 394e6 * 297) * 2))

    assert p["totals"]["seconds"] == pytest.approx(sum(s["seconds"] for s in p["stages"]))
    assert p["totals"]["dollars"] == pytest.approx(sum(s["dollars"] for s in p["stages"]))
    out = capsys.readouterr().out
    assert "select_candidates" in out and "rates used:" in out and "select_captions: 5 items/s per vcpu (ours" in out


def test_json_output_and_a_cpu_only_plan(data, capsys):
    assert plan.main(data + ["--json", "--gpu", "none", "--llm", "none", "--draft_decode", "no"]) == 0
    p = json.loads(capsys.readouterr().out)
    names = [s["name"] for s in p["stages"]]
    assert names == ["build_entity_index", "select_candidates", "download_images", "decontaminate"]  # no LLM, no GPU training
    for s in p["stages"]:
        assert set(s) >= {"name", "work", "seconds", "dollars", "limit"}
    dec = p["stages"][3]
    # On CPU: the ViT-S/32 rate (1 image/s a vCPU) scaled by the FLOPs ratio to ViT-L/14.
    ratio = (2 * 304e6 * 257) / (2 * 22e6 * 50)
    assert dec["seconds"] == pytest.approx(200 / (1 / ratio * 6))
    assert set(p["totals"]) == {"seconds", "dollars"}


def test_misuse_names_the_flag(data, capsys):
    with pytest.raises(UsageError, match="--gpu 'TPU' is not in"):
        plan.run(data + ["--gpu", "TPU"])
    with pytest.raises(UsageError, match="--llm 'gpt-9' has no price"):
        plan.run(data + ["--llm", "gpt-9"])
    with pytest.raises(UsageError, match="--prices: .* does not exist"):
        plan.run(data + ["--prices", "/nonexistent/prices.json"])
    with pytest.raises(UsageError, match="no entry 'ivf_scan_sq8'"):
        rates = json.load(open(data[data.index("--throughputs") + 1]))
        del rates["ivf_scan_sq8"]
        json.dump(rates, open(data[data.index("--throughputs") + 1], "w"))
        plan.run(data)
    assert plan.main(data + ["--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_the_shipped_data_files_plan_the_full_job():
    p = plan.run(["--entities", "6063945", "--captions", "2.3e9", "--k", "100", "--images", "50e6"])
    assert all(s["seconds"] > 0 and s["dollars"] >= 0 for s in p["stages"])
    assert {k for k in p["assumptions"]} >= {"select_captions", "ivf_scan_sq8", "text_encoder_titles"}
    # nlist: the power of two at or above 4 x sqrt(6,063,945) = 9,850, the README's IVF16384,SQ8.
    sel = {s["name"]: s for s in p["stages"]}["select_candidates"]
    assert sel["notes"][0].startswith("IVF16384,SQ8 nprobe 64: 40,071 vectors")


def test_the_cascade_row_prices_the_self_hosted_gpu_and_the_escalated_share(data):
    p = plan.run(data + ["--self_hosted_requests_per_s", "2", "--escalate_share", "0.2", "--rew_design", "cascade"])
    rows = {r["key"]: r for r in p["rew_designs"]}
    # The plan's GPU "g" at $3.6/h answering 2 requests/s, plus 20 % of samples asked again
    # at the API in one request.
    per_sample = 3.6 / (2 * 3600) + 0.2 * rows["one"]["usd_per_million"] / 1e6
    assert rows["cascade"]["usd_per_million"] == pytest.approx(per_sample * 1e6, abs=0.01)
    ref = {s["name"]: s for s in p["stages"]}["refine"]
    assert ref["dollars"] == pytest.approx(200 * per_sample, rel=1e-6)
    # Without a rate for the self-hosted model there is no cascade row, and asking for it says why.
    with pytest.raises(UsageError, match="--self_hosted_requests_per_s"):
        plan.run(data + ["--rew_design", "cascade"])
    with pytest.raises(UsageError, match="--self_hosted_gpu 'TPU' has no price"):
        plan.run(data + ["--self_hosted_gpu", "TPU"])


def test_a_recipe_sets_the_plans_settings_and_flags_still_win(tmp_path):
    """pipelines.plan --recipe: the settings of the recipe's stages (k, the LLM, its backend,
    requests per sample, image side, cascade) become the plan's; a flag given wins."""
    import os

    from pipelines import plan

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rew = os.path.join(root, "recipes", "rew.yaml")
    a = plan.parse_args(["--recipe", rew, "--entities", "6e6", "--captions", "2e9"])
    assert (a.llm, a.llm_backend, a.requests_per_sample, a.image_side, a.train_epochs) == ("gpt-4.1-mini", "batch", 2.0, 512, 0.0)
    laion = os.path.join(root, "recipes", "entity_laion.yaml")
    b = plan.parse_args(["--recipe", laion, "--entities", "6e6", "--captions", "2e9", "--k", "20"])
    assert (b.k, b.llm) == (20, "none")  # the flag wins over the recipe's k: 50; no refine stage, no LLM
    text = open(rew).read().replace("rew_requests: 2", "rew_requests: 1\n      max_image_side: 384\n      escalate_backend: openai")
    (tmp_path / "r.yaml").write_text(text)
    c = plan.parse_args(["--recipe", str(tmp_path / "r.yaml"), "--entities", "6e6", "--captions", "2e9"])
    assert (c.requests_per_sample, c.image_side, c.rew_design) == (1.0, 384, "cascade")
