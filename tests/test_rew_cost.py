"""REW at a lower price, against loopback servers (tests/fake_llm_server.py): one request per
sample, no rationale request for a sample that is dropped, prompts whose static part is a
byte-identical prefix with the provider's cached tokens priced at the cached rate, and
escalation of exactly the uncertain answers to a second backend."""

import glob
import json

import pyarrow.parquet as pq
import pytest

from pipelines import refine
from prompts import load_prompt
from tests.fake_llm_server import FakeLLMServer
from tests.helpers import read_rejects
from tests.test_refine import TITLES, base_args, write_samples
from transforms.schema import Sample, column_names
from transforms.stages.refine import RequestSettings, rationale_request, rew_request, verify_request

CASES = {
    "ok": ("Q243", "Eiffel Tower at night"),
    "liberty": ("Q9202", "Statue of Liberty ferry view"),
    "to_taj": ("Q243", "[[CORRECT_TO:taj  mahal]] white marble mausoleum"),
    "to_nowhere": ("Q146", "[[CORRECT_TO:Zorblax Quantum Teapot 9000]] odd object"),
    "notentity": ("Q146", "[[NOTENTITY]] blue pattern"),
}


def _rows(out):
    return {r["key"]: r for r in pq.read_table(glob.glob(str(out / "samples-*.parquet"))).to_pylist()}


def _answers(server):
    """(caption, answer object) of every request the server answered."""
    out = []
    for r in server.requests:
        cap = r["text"].split("<<<CAPTION", 1)[-1].split("CAPTION>>>", 1)[0].strip()
        out.append((cap, r["text"]))
    return out


def test_one_request_mode_writes_the_same_records_and_drops_pay_no_rationale(tmp_path, catalog_path, entity_index):
    inputs = write_samples(tmp_path / "s.parquet", CASES)
    with FakeLLMServer() as server:
        one = refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "one", tmp_path / "cache")
                         + ["--llm_backend", "openai", "--endpoint", server.url, "--rew_requests", "1"])
        sent_one = list(server.requests)
        two = refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "two", tmp_path / "cache")
                         + ["--llm_backend", "openai", "--endpoint", server.url])
        sent_two = server.requests[len(sent_one):]
    assert one["count_check"] == "ok" and two["count_check"] == "ok"
    # One request per sample; the two-request mode shares no cache entry with it (another
    # prompt, so another key): all its requests were sent.
    assert len(sent_one) == len(CASES)
    assert len(sent_two) == len(CASES) + 3  # verify x5, then rationale + QA for the 3 kept
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    # The same samples are kept, with the same entities, verdicts and grounding.
    assert set(a) == set(b) == {"ok", "liberty", "to_taj"}
    for key in a:
        for col in ("qid", "title", "verdict", "changed", "candidate_qid", "grounding_method", "llm_model"):
            assert a[key][col] == b[key][col], (key, col)
        assert a[key]["rationale"] and len(json.loads(a[key]["qa_json"])) == 3
        assert a[key]["verify_prompt"].startswith("rew/v1@") and a[key]["rationale_prompt"] == a[key]["verify_prompt"]
    # The same record schema in both modes (every Sample column, nothing else).
    table_one = pq.read_table(glob.glob(str(tmp_path / "one" / "samples-*.parquet")))
    table_two = pq.read_table(glob.glob(str(tmp_path / "two" / "samples-*.parquet")))
    assert table_one.schema == table_two.schema and table_one.column_names == column_names(Sample)
    # The same rejects, for the same reasons.
    rej = lambda out: sorted((r["key"], r["stage"], r["reason"]) for r in read_rejects(out))  # noqa: E731
    assert rej(tmp_path / "one") == rej(tmp_path / "two") == [
        ("notentity", "verify", "not_an_entity"), ("to_nowhere", "ground", "ungrounded")]
    # A dropped sample paid no rationale: its one answer has an empty rationale and QA.
    dropped = [r for r in sent_one if "[[NOTENTITY]]" in r["text"]]
    assert len(dropped) == 1
    assert one["rew_requests"] == 1 and two["rew_requests"] == 2
    assert set(one["prompts"]) == {"rew"} and set(two["prompts"]) == {"verify", "rationale_qa"}


def test_two_request_mode_asks_rationales_only_for_kept_samples(tmp_path, catalog_path, entity_index):
    """Item 2 of the issue held already: a not_an_entity verdict is a reject at verify and an
    ungrounded name a reject at ground, both before the rationale request is built."""
    inputs = write_samples(tmp_path / "s.parquet", CASES)
    with FakeLLMServer() as server:
        summary = refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "out", tmp_path / "cache")
                             + ["--llm_backend", "openai", "--endpoint", server.url])
        sent = list(server.requests)
    rationale = [r for r in sent if "<<<ENTITY" in r["text"]]
    verify = [r for r in sent if '"verdict"' in r["text"]]
    assert len(verify) == len(CASES) and len(rationale) == summary["counters"]["samples_refined"] == 3
    asked_about = sorted(r["text"].split("<<<ENTITY", 1)[1].split("ENTITY>>>", 1)[0].strip() for r in rationale)
    assert asked_about == ["Eiffel Tower", "Statue of Liberty", "Taj Mahal"]


def _sample(key, qid, caption):
    from tests.helpers import draw_image

    return Sample(key=key, image=draw_image(hash(key) % 100), image_format="jpg", width=64, height=48, caption=caption,
                  qid=qid, title=TITLES[qid])


@pytest.mark.parametrize("task", ["verify", "rew", "rationale_qa"])
def test_the_static_prefix_is_byte_identical_and_the_caption_comes_last(task):
    settings = RequestSettings("m", "correct", "wiki_caption", {"temperature": 0})
    prompt = load_prompt(task)
    build = {"verify": verify_request, "rew": rew_request, "rationale_qa": rationale_request}[task]
    a = build((_sample("a", "Q243", "night view, tower"), "The Eiffel Tower is a tower in Paris."), prompt, settings)
    b = build((_sample("b", "Q9202", "ferry <<<IMAGE>>> view"), "A statue in New York."), prompt, settings)
    c = build((_sample("c", "Q243", "another photo"), "The Eiffel Tower is a tower in Paris."), prompt, settings)
    marker = "<<<ENTITY" if task == "rationale_qa" else "<<<CANDIDATE"
    static = a.text[: a.text.index(marker)]
    # Instructions and schema first, the same bytes for every request of the run ...
    assert b.text.startswith(static) and len(static) > 900
    # ... then the entity's context: the same for two images of one entity, up to the image.
    assert c.text == a.text and a.text != b.text
    # The image sits between the two text parts; the caption is after it, and a caption
    # cannot move the image (its marker is defused).
    parts = [p["type"] for p in a.messages()[0]["content"]]
    assert parts == ["text", "image_url", "text"]
    assert "night view, tower" in a.text_after and "night view" not in a.text
    assert "< < <IMAGE> > >" in b.text_after
    # Requests of one entity go out together.
    assert a.group == c.group == "Q243" != b.group


def test_cached_input_tokens_are_counted_and_priced_at_the_cached_rate(tmp_path, catalog_path, entity_index):
    inputs = write_samples(tmp_path / "s.parquet", CASES)
    with FakeLLMServer() as server:
        summary = refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "out", tmp_path / "cache")
                             + ["--llm_backend", "openai", "--endpoint", server.url, "--max_concurrency", "1",
                                "--usd_per_million_input_tokens", "0.4", "--usd_per_million_output_tokens", "1.6",
                                "--usd_per_million_cached_input_tokens", "0.1"])
        usages = list(server.usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    # Every verify request after the first finds the static instructions cached (~200 tokens).
    verify_cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages[: len(CASES)]]
    assert verify_cached[0] == 0 and min(verify_cached[1:]) > 150
    assert summary["counters"]["llm_cached_input_tokens"] == cached == summary["tokens"]["cached_input"]
    by_hand = ((prompt - cached) * 0.4 + cached * 0.1 + completion * 1.6) / 1e6
    assert summary["cost_usd"] == pytest.approx(by_hand, rel=1e-9)
    assert summary["backends"]["first"]["cost_usd"] == pytest.approx(by_hand, rel=1e-9)


ESCALATION_CASES = {
    "sure": ("Q243", "Eiffel Tower at night"),
    "sure95": ("Q9202", "[[CONF:0.95]] Statue of Liberty"),
    "unsure": ("Q243", "[[CONF:0.3]] tower in fog"),
    "unsure_drop": ("Q146", "[[CONF:0.5]] [[NOTENTITY]] pattern"),
    "ungrounded": ("Q146", "[[CORRECT_TO:Zorblax Quantum Teapot 9000]] odd object"),
    "invalid": ("Q9202", "[[ALWAYSBAD]] statue"),
    "sure_drop": ("Q146", "[[NOTENTITY]] blue pattern"),
    "to_taj": ("Q243", "[[CORRECT_TO:taj  mahal]] white marble mausoleum"),
}
ESCALATED = {"unsure": "correct", "unsure_drop": "not_an_entity", "ungrounded": "corrected", "invalid": "invalid"}


def _caption_keys(requests, cases):
    keys = []
    for r in requests:
        for key, (_qid, caption) in cases.items():
            if caption in r["text"]:
                keys.append(key)
    return keys


@pytest.mark.slow
@pytest.mark.parametrize("rew_requests", ["2", "1"])
def test_escalation_sends_exactly_the_uncertain_answers_and_a_rerun_pays_neither(tmp_path, catalog_path, entity_index,
                                                                                 rew_requests):
    inputs = write_samples(tmp_path / "s.parquet", ESCALATION_CASES)
    out, cache = tmp_path / "out", tmp_path / "cache"
    prices = ["--usd_per_million_input_tokens", "0.05", "--usd_per_million_output_tokens", "0.2",
              "--escalate_usd_per_million_input_tokens", "0.4", "--escalate_usd_per_million_output_tokens", "1.6"]
    with FakeLLMServer() as first, FakeLLMServer(plain=True) as strong:
        args = (base_args(tmp_path, catalog_path, entity_index, inputs, out, cache)
                + ["--llm_backend", "openai", "--endpoint", first.url, "--rew_requests", rew_requests,
                   "--escalate_backend", "openai", "--escalate_endpoint", strong.url, "--escalate_model", "strong-vlm",
                   "--escalate_below", "0.8", "--max_reasks", "1", *prices])
        summary = refine.run(args)
        first_sent, strong_sent = list(first.requests), list(strong.requests)
        first_usage, strong_usage = list(first.usages), list(strong.usages)
        # A re-run on the same output and cache pays neither backend again.
        again = refine.run(args)
        assert len(first.requests) == len(first_sent) and len(strong.requests) == len(strong_sent)
    assert summary["count_check"] == "ok", summary["count_check"]
    assert again["count_check"] == "ok" and again["backends"]["first"]["requests"] == again["backends"]["escalate"]["requests"] == 0
    # Exactly the low-confidence, ungrounded and schema-failing answers went to the strong model.
    verify_strong = [r for r in strong_sent if '"verdict"' in r["text"]]
    assert sorted(_caption_keys(verify_strong, ESCALATION_CASES)) == sorted(ESCALATED)
    # The first backend was asked once per sample (plus the re-ask of the invalid one, plus
    # in two-request mode the rationales of what it decided and kept).
    assert all(r.get("format") for r in first_sent)
    rows = _rows(out)
    rejects = {r["key"]: r for r in read_rejects(out)}
    assert set(rows) | set(rejects) == set(ESCALATION_CASES) and not set(rows) & set(rejects)
    for key, first_verdict in ESCALATED.items():
        if key in rows:
            row = rows[key]
            assert row["escalated"] is True and row["llm_model"] == "strong-vlm" and row["first_verdict"] == first_verdict, key
    # The strong model saw no markers: the escalated ones are kept as their candidates.
    assert {"unsure", "unsure_drop", "ungrounded", "invalid"} <= set(rows)
    assert rows["unsure"]["verdict_prob"] == pytest.approx(0.3, rel=1e-4)
    for key in ("sure", "sure95", "to_taj"):
        assert not rows[key]["escalated"] and rows[key]["llm_model"] == "fake-vlm", key
    assert rows["sure95"]["verdict_prob"] == pytest.approx(0.95, rel=1e-4) and rows["sure"]["verdict_prob"] == pytest.approx(1.0)
    assert rejects["sure_drop"]["reason"] == "not_an_entity"
    # The decider writes the rationale: in two-request mode the escalated samples' rationale
    # requests went to the strong model, the others' to the first.
    if rew_requests == "2":
        rationale_strong = [r for r in strong_sent if "<<<ENTITY" in r["text"]]
        assert sorted(_caption_keys(rationale_strong, ESCALATION_CASES)) == sorted(ESCALATED)
        rationale_first = [r for r in first_sent if "<<<ENTITY" in r["text"]]
        assert sorted(_caption_keys(rationale_first, ESCALATION_CASES)) == ["sure", "sure95", "to_taj"]
    # The manifest: escalated share, and per backend the tokens the servers reported and the
    # dollars at each backend's prices.
    esc = summary["escalation"]
    assert esc["escalated"] == {"low_confidence": 2, "ungrounded": 1, "invalid": 1}
    assert esc["escalated_share"] == pytest.approx(4 / len(ESCALATION_CASES))
    for name, usage, (p_in, p_out) in (("first", first_usage, (0.05, 0.2)), ("escalate", strong_usage, (0.4, 1.6))):
        b = summary["backends"][name]
        assert b["input"] == sum(u["prompt_tokens"] for u in usage) and b["output"] == sum(u["completion_tokens"] for u in usage)
        assert b["requests"] == len(usage)
        assert b["cost_usd"] == pytest.approx((b["input"] * p_in + b["output"] * p_out) / 1e6, rel=1e-9)
    assert summary["cost_usd"] == pytest.approx(summary["backends"]["first"]["cost_usd"] + summary["backends"]["escalate"]["cost_usd"])
    # The dataset card says which design and which models decided.
    card = (out / "README.md").read_text()
    assert "strong-vlm (openai), 50.0 % of samples escalated" in card and f"`{rew_requests} (" in card


def test_escalation_flags_are_checked(tmp_path, catalog_path, entity_index):
    from transforms.errors import UsageError

    inputs = write_samples(tmp_path / "s.parquet", {"ok": CASES["ok"]})
    base = base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "o", tmp_path / "c") + [
        "--llm_backend", "openai", "--endpoint", "http://127.0.0.1:9/v1"]
    for extra, says in (
        (["--escalate_model", "x"], "--escalate_model without --escalate_backend"),
        (["--escalate_backend", "openai", "--escalate_endpoint", "http://127.0.0.1:9/v1"], "needs --escalate_model"),
        (["--escalate_backend", "openai", "--escalate_model", "x", "--escalate_when", "low_confidence,typo"], "--escalate_when"),
        (["--escalate_backend", "openai", "--escalate_model", "x", "--escalate_below", "1.5"], "--escalate_below"),
    ):
        with pytest.raises(UsageError, match=says):
            refine.run(base + extra)


def test_the_vllm_backend_starts_with_prefix_caching_unless_told_not_to(tmp_path):
    def kwargs(*extra):
        args = refine.build_parser().parse_args(["--input", "x", "--entities", "y", "--output", str(tmp_path), "--model", "tiny",
                                                 "--llm_backend", "vllm", *extra])
        return refine.llm_handler(args)._vllm_server_kwargs

    assert "enable-prefix-caching" in kwargs()
    off = kwargs("--vllm_server_arg", "no-enable-prefix-caching")
    assert "enable-prefix-caching" not in off and "no-enable-prefix-caching" in off


def _square_samples(path, cases, side):
    """Samples whose recorded size is `side` x `side` (the estimate reads sizes, not pixels)."""
    import pyarrow as pa

    from tests.helpers import draw_image
    from transforms.schema import arrow_schema, to_row

    rows = [to_row(Sample(key=k, image=draw_image(i), image_format="jpg", width=side, height=side, caption=cap, qid=q,
                          title=TITLES[q], source="t")) for i, (k, (q, cap)) in enumerate(sorted(cases.items()))]
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Sample)), path)
    return str(path)


def test_the_estimate_prices_the_designs_and_agrees_with_the_planner(tmp_path, catalog_path, capsys):
    from pipelines import plan

    inputs = _square_samples(tmp_path / "s.parquet", CASES, 1600)
    est = refine.run(["--input", inputs, "--entities", catalog_path, "--model", "gpt-4.1-mini", "--output", str(tmp_path / "x"),
                      "--estimate_only", "--llm_prices", "gpt-4.1-mini", "--llm_backend", "openai_batch"])
    printed = capsys.readouterr().out
    rows = {r["key"]: r for r in est["designs"]}
    assert list(rows) == ["today", "two", "one", "one_cheapest", "cascade"]
    # gpt-4.1-mini meters 32 px patches x 1.62: 1024 px -> 1,659 tokens, 512 -> 415, 384 -> 234.
    assert "I = 1659 tokens" in rows["today"]["note"] and "I = 415 tokens" in rows["two"]["note"]
    assert rows["one_cheapest"]["design"] == "one request (384 px)" and "I = 234 tokens" in rows["one_cheapest"]["note"]
    # One request is cheaper than two at the same side, and says by how much; the cascade is
    # the cheapest; every row is priced at batch prices (half of 0.40 / 1.60).
    assert rows["one"]["usd_per_million"] < rows["two"]["usd_per_million"] < rows["today"]["usd_per_million"]
    saving = rows["two"]["usd_per_million"] / rows["one"]["usd_per_million"]
    assert f"{saving:.2f}x cheaper than 2 requests at 512 px" in rows["one"]["note"]
    assert min(rows.values(), key=lambda r: r["usd_per_million"])["key"] == "cascade"
    assert est["designs"][0]["prices"] == {"model": "gpt-4.1-mini", "usd_in": 0.4, "usd_out": 1.6, "batch_factor": 0.5}
    assert "$ per 1M samples on gpt-4.1-mini (batch" in printed and "cascade (H100-80GB first, 15% to gpt-4.1-mini)" in printed
    # The planner, given the verify prompt's measured size, prices the same designs within a
    # few per cent (its rationale and one-request prompts are instructions + the same data).
    verify_tokens = est["text_tokens_per_request"]["verify"]
    p = plan.run(["--entities", "10", "--captions", "100", "--images", "1000", "--llm", "gpt-4.1-mini",
                  "--prompt_tokens", str(verify_tokens)])
    assert {r["key"] for r in p["rew_designs"]} == set(rows)
    for r in p["rew_designs"]:
        assert r["usd_per_million"] == pytest.approx(rows[r["key"]]["usd_per_million"], rel=0.08), r["key"]


def test_gemini_online_through_its_openai_compatible_root_and_its_image_rule(tmp_path, catalog_path):
    from transforms.llm.client import _chat_url

    assert (_chat_url("https://generativelanguage.googleapis.com/v1beta/openai/")
            == "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions")
    assert _chat_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1/chat/completions"
    assert _chat_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1/chat/completions"
    # --llm_prices names Gemini: its prices and its image rule (258 tokens for an image of at
    # most 384 px a side, 258 per 768 px tile above) price the estimate.
    inputs = _square_samples(tmp_path / "s.parquet", CASES, 300)
    est = refine.run(["--input", inputs, "--entities", catalog_path, "--model", "gemini-2.0-flash-lite", "--output",
                      str(tmp_path / "x"), "--estimate_only", "--llm_prices", "gemini-2.0-flash-lite"])
    assert est["input_tokens"]["image_rule"] == "gemini" and est["input_tokens"]["image"] == 2 * len(CASES) * 258
    assert est["designs"][0]["prices"]["usd_in"] == 0.075


@pytest.mark.slow
def test_a_killed_escalating_run_started_again_repays_neither_backend(tmp_path, catalog_path, entity_index):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_refine import stored

    inputs = write_samples(tmp_path / "s.parquet", ESCALATION_CASES)
    cache = tmp_path / "cache"

    def args(out, first, strong):
        return base_args(tmp_path, catalog_path, entity_index, inputs, out, cache) + [
            "--llm_backend", "openai", "--endpoint", first.url, "--rew_requests", "1", "--max_concurrency", "1",
            "--escalate_backend", "openai", "--escalate_endpoint", strong.url, "--escalate_model", "strong-vlm"]

    # The strong model answers two escalated samples, then hangs: the run is killed there.
    with FakeLLMServer() as first, FakeLLMServer(plain=True, max_answers=2) as strong:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.refine", *args(tmp_path / "out1", first, strong)],
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while sum(strong.answered.values()) < 2 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the cache's write-behind (2 s) stores the answers
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        paid_first = {h for h, n in first.answered.items() if n}
        paid_strong = {h for h, n in strong.answered.items() if n}
    assert len(paid_strong) == 2 and len(paid_first) >= len(ESCALATION_CASES)
    with FakeLLMServer() as first, FakeLLMServer(plain=True) as strong:
        summary = refine.run(args(tmp_path / "out2", first, strong))
        again_first, again_strong = set(first.seen), set(strong.seen)
    assert summary["count_check"] == "ok"
    assert not paid_first & again_first, "the first backend was paid twice"
    assert not paid_strong & again_strong, "the escalation backend was paid twice"
    assert summary["escalation"]["escalated"] == {"low_confidence": 2, "ungrounded": 1, "invalid": 1}
    assert stored(cache) > 0
