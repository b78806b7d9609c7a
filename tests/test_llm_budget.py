"""The job-wide LLM budget: shares that add up to the total among the processes sending,
the slow-down controller, and the budget holding across two SDK processes against a
loopback endpoint that counts what it receives."""

import asyncio
import time

import pytest

from pipelines import refine
from tests.fake_llm_server import FakeLLMServer
from tests.test_refine import base_args, write_samples
from transforms.llm import budget as llm_budget
from transforms.llm.budget import Budget, BudgetSpec, Registry, _Bucket

MULTI = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]


def test_shares_add_up_to_the_total_and_idle_members_give_theirs_up(tmp_path):
    regs = [Registry(str(tmp_path), refresh_s=60.0) for _ in range(3)]
    try:
        for r in regs:
            r.refresh()
        assert [r.members for r in regs] == [3, 3, 3]
        assert sum(r.share(10) for r in regs) == 10 and sorted(r.share(10) for r in regs) == [3, 3, 4]
        assert sum(r.share(2) for r in regs) == 2  # fewer slots than members: some get none
        assert abs(sum(r.share(7.5, whole=False) for r in regs) - 7.5) < 1e-9
        # One goes idle (nothing asked for two periods): the others split the total.
        idle = regs[2]
        idle._wanted -= 1000
        idle.beat()
        for r in regs[:2]:
            r.refresh()
        assert [r.members for r in regs[:2]] == [2, 2] and regs[0].share(10) + regs[1].share(10) == 10
        # A member that left is gone from the others' view.
        regs[1].leave()
        regs[0].refresh()
        assert regs[0].members == 1 and regs[0].share(10) == 10
    finally:
        for r in regs:
            r.leave()


def test_stale_heartbeats_do_not_count(tmp_path):
    import os

    dead = tmp_path / f"0000000000000-dead{'.active'}{llm_budget.HEARTBEAT_SUFFIX}"
    dead.write_text("{}")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))  # a killed process's last beat
    reg = Registry(str(tmp_path), refresh_s=1.0)
    try:
        assert reg.members == 1
    finally:
        reg.leave()


def test_a_worker_between_two_batches_does_not_wait_to_come_back(tmp_path):
    """A batch that took longer than two periods ends and the next begins at once: the
    process was sending all along, so its next request goes without a settle period."""
    spec = BudgetSpec(requests_per_minute=6000, registry=str(tmp_path), refresh_s=0.2)
    reg = Registry(str(tmp_path), refresh_s=0.2)
    budget = Budget(spec, reg)

    async def batch_then_next():
        await budget.acquire(0)  # the first batch asks for its slots at once ...
        reg._settle_until = 0.0
        reg._wanted -= 10.0  # ... long ago: the batch ran for many periods
        await budget.release()  # its last request finishes now
        started = time.monotonic()
        await budget.acquire(0)  # the next batch's first request
        await budget.release()
        return time.monotonic() - started

    try:
        assert asyncio.run(batch_then_next()) < 0.5 * llm_budget.SETTLE_PERIODS * 0.2
        assert not reg.settling()
    finally:
        reg.leave()


def test_slow_down_lowers_the_pace_and_it_grows_back(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(llm_budget.time, "monotonic", lambda: clock[0])
    b = Budget(BudgetSpec(max_concurrency=8, requests_per_minute=600))  # 10/s, one process
    assert b.request_rate() == 10.0
    for _ in range(40):  # answered at 8/s for the last seconds
        clock[0] += 0.125
        b.on_answer()
    b.on_rate_limited()
    assert b.request_rate() == 10.0  # one refusal among 40 answers: waited out, no cut
    b.on_rate_limited()
    b.on_rate_limited()  # 3 of the last 43 tries refused: over 5 %, a real limit
    assert b.request_rate() == pytest.approx(0.9 * 8, rel=0.05)
    lowered = b.request_rate()
    b.on_rate_limited()  # a second refusal within five seconds: no second cut
    assert b.request_rate() == lowered
    clock[0] += 3
    assert lowered < b.request_rate() < 10.0  # slow increase near the limit
    clock[0] += 60
    assert b.request_rate() == 10.0  # back at the configured rate


def test_a_refusal_now_and_then_does_not_collapse_the_rate(monkeypatch):
    """A provider's stray 429 once a second (not about our rate) for two minutes: the pace
    dips and recovers instead of decaying towards the floor."""
    clock = [1000.0]
    monkeypatch.setattr(llm_budget.time, "monotonic", lambda: clock[0])
    b = Budget(BudgetSpec(max_concurrency=8, requests_per_minute=600))
    for second in range(120):
        while clock[0] < 1000.0 + second + 1:  # answered at exactly the pace it sends
            clock[0] += 1.0 / b.request_rate()
            b.on_answer()
        b.on_rate_limited()
    assert b.request_rate() > 0.6 * 10.0, b.request_rate()


def test_refused_before_any_answer_falls_to_the_floor_not_a_storm(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(llm_budget.time, "monotonic", lambda: clock[0])
    b = Budget(BudgetSpec(max_concurrency=64))
    assert b.request_rate() == 0.0  # no rate given: not paced until told to slow down
    b.on_rate_limited()
    assert b.request_rate() == llm_budget.MIN_RATE_PER_S
    clock[0] += 5
    assert b.request_rate() == pytest.approx(llm_budget.MIN_RATE_PER_S * 2**5, rel=0.01)  # doubles from there
    for _ in range(100):
        b.on_answer()
    b.on_rate_limited()  # a stray refusal among answers: no cut, and the doubling goes on
    clock[0] += 2
    assert b.request_rate() == pytest.approx(llm_budget.MIN_RATE_PER_S * 2**7, rel=0.01)


def test_requests_are_evenly_spaced_at_the_rate():
    async def go():
        bucket = _Bucket(lambda: 50.0)
        sent = []
        for _ in range(11):
            await bucket.take(1)
            sent.append(time.monotonic())
        return sent

    sent = asyncio.run(go())
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    # Never two in less than the spacing (a burst is what a sliding-window limiter refuses).
    assert min(gaps) >= 0.02 - 0.002, gaps


@pytest.mark.slow
def test_job_wide_concurrency_holds_with_two_sdk_processes(tmp_path, catalog_path, entity_index):
    cases = {f"c{i:03d}": ("Q243" if i % 2 else "Q9202", f"photo {i}") for i in range(24)}
    inputs = write_samples(tmp_path / "s.parquet", cases)
    with FakeLLMServer(latency_s=0.3) as server:
        summary = refine.run(
            base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "out", tmp_path / "cache")
            + ["--llm_backend", "openai", "--endpoint", server.url, "--max_concurrency", "16",
               "--max_total_concurrency", "4", "--budget_refresh", "0.3", *MULTI]
        )
        most = server.max_in_flight
    assert summary["count_check"] == "ok" and summary["counters"]["samples_refined"] == 24
    # 16 per process would allow 32; the job's 4 is divided between the two processes.
    assert 2 <= most <= 4, most


@pytest.mark.slow
def test_rate_budget_over_two_processes_keeps_under_the_server_limit(tmp_path, catalog_path, entity_index):
    """The job's --max_requests_per_minute a little under what the server allows: the two
    processes' shares together never trip the limit, so nothing is refused."""
    cases = {f"r{i:03d}": ("Q243" if i % 2 else "Q9202", f"photo {i}") for i in range(30)}
    inputs = write_samples(tmp_path / "s.parquet", cases)
    with FakeLLMServer(rate_limit_per_s=20) as server:
        summary = refine.run(
            base_args(tmp_path, catalog_path, entity_index, inputs, tmp_path / "out", tmp_path / "cache")
            + ["--llm_backend", "openai", "--endpoint", server.url, "--max_concurrency", "16",
               "--max_requests_per_minute", str(0.9 * 20 * 60), "--budget_refresh", "0.3", *MULTI]
        )
        limited, answered = server.rate_limited, sum(server.answered.values())
    assert summary["count_check"] == "ok" and answered == 60
    assert limited <= 2, limited
