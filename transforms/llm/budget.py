"""One request budget for the whole job, shared by every SDK process that calls the LLM.

A job on a cluster runs hundreds of SDK processes (Dataflow: one per vCPU of every
worker); a limit per process multiplies with their number. Here the job's limits
(`--max_total_concurrency`, `--max_requests_per_minute`, `--max_tokens_per_minute`) are
divided among the processes that are actually running:

* **Membership**: each process that calls the endpoint writes a heartbeat file into a
  folder every job can reach (`<output>/_llm_budget/`, local or gs://) every
  `refresh_s` seconds, and lists the folder at the same pace. The live members are those
  whose heartbeat is younger than three periods; a process takes `total // n` (the first
  `total % n` members by id one more), so the shares add up to the total. When the runner
  adds or removes workers the shares follow within one period. A process that starts (or
  starts again) to send waits one and a half periods first, so the members already
  sending have seen it and lowered their shares.
* **Rates**: requests go evenly spaced at the process's share of the requests per minute
  (a server that counts in a sliding window is never sent a burst above its limit);
  tokens per minute are a bucket at its share with a tenth of a second of burst.
* **Slow down when told**: a 429 or 503 lowers this process's send rate to 90 % of the
  rate it was being answered at (at most once in five seconds); the rate grows again by 2 %
  a second, 10 % a second once five seconds passed without a refusal (a multiplicative
  decrease and a slow increase, as TCP's congestion control does); the request itself
  waits the server's Retry-After. A process refused before anything was answered falls to
  one request every ten seconds and doubles from there: no storm.

Cost at scale: one small object write and one listing per process per period (10 s by
default: 800 processes are 80 writes and 80 listings a second, each listing 800 entries).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Optional

from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

HEARTBEAT_SUFFIX = ".member.json"
STALE_PERIODS = 3
# A member (re)starting to send waits this many periods: every busy member has listed the
# folder at least once since its heartbeat was written, whatever their phases.
SETTLE_PERIODS = 1.5
MIN_RATE_PER_S = 0.1  # a process told to slow down with nothing answered: one request per 10 s
MAX_RATE_PER_S = 1e6  # a pace that grew past any real limit (no rate given) stops growing here
DECREASE = 0.9  # a rate-limit answer: send at 90 % of the rate answered in the last seconds
INCREASE = 0.02  # then 2 % more each second while near the limit,
FAST_INCREASE = 0.10  # and 10 % a second once FAST_AFTER_S seconds passed and refusals are rare
FAST_AFTER_S = 5.0
SEARCH_AFTER_S = 15.0  # and doubling each second after this long far from the limit
# At most one decrease in this many seconds: a refusal now and then (a provider's 429s are
# not all about our rate) costs 10 % that the next 5 s of growth nearly give back, never
# a collapse; a real overshoot is cut by 10 % every 5 s until the refusals stop.
DECREASE_EVERY_S = 5.0
# ... unless the refusals are dense: this many at least, and this share of the tries.
DENSE_REFUSALS = 4
DENSE_SHARE = 0.25
# No cut at all while refusals are under this share of the tries of the last SHARE_WINDOW_S.
MIN_SHARE = 0.05
SHARE_WINDOW_S = 5.0
BURST_S = 0.1


@dataclass(frozen=True)
class BudgetSpec:
    """Limits as the user gave them (0 = none). `max_concurrency` is per process, the
    others are for the whole job."""

    max_concurrency: int = 16
    total_concurrency: int = 0
    requests_per_minute: float = 0.0
    tokens_per_minute: float = 0.0
    registry: Optional[str] = None
    refresh_s: float = 10.0
    expected_members: int = 1

    @property
    def job_wide(self) -> bool:
        return bool(self.total_concurrency or self.requests_per_minute or self.tokens_per_minute)


class Registry:
    """Members of the job that are sending, by heartbeat files in a shared folder.

    A member's file is `<id>.active.member.json` while it has requests to send (asked for
    a slot, or had one finish, within the last two periods) and `<id>.idle.member.json` otherwise: an idle
    process (a skewed stage, a worker between bundles) takes no share from the busy ones.
    """

    def __init__(self, folder: str, refresh_s: float, expected: int = 1, member_id: Optional[str] = None):
        self.folder = folder.rstrip("/")
        self.refresh_s = refresh_s
        self.expected = max(1, expected)
        self.id = member_id or f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:12]}"
        self.joined = time.monotonic()
        self._wanted = time.monotonic()  # last time this process asked for or gave back a slot
        self._settle_until = self.joined + SETTLE_PERIODS * refresh_s
        self._state: Optional[str] = None
        self.busy: list = []  # callables: a budget with requests waiting or in flight
        self._active: list[str] = [self.id]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._beat_lock = threading.Lock()
        self.beat()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="llm-budget", daemon=True)
        self._thread.start()
        atexit.register(self.leave)

    def _path(self, state: str) -> str:
        return f"{self.folder}/{self.id}.{state}{HEARTBEAT_SUFFIX}"

    def is_active(self) -> bool:
        return time.monotonic() - self._wanted < 2 * self.refresh_s or any(busy() for busy in self.busy)

    def want(self) -> None:
        """This process asks for a slot. Coming back from idle, it waits one period (as a
        new member does), so the busy members see it before it sends."""
        now = time.monotonic()
        if not self.is_active():
            self._settle_until = now + SETTLE_PERIODS * self.refresh_s
            self._wanted = now
            threading.Thread(target=self.beat, name="llm-budget-beat", daemon=True).start()
        self._wanted = now

    def touch(self) -> None:
        """A request of this process just finished: it is still sending (a worker between
        two batches must not count as coming back from idle and wait a period again)."""
        self._wanted = time.monotonic()

    def beat(self) -> None:
        with self._beat_lock:
            self._beat()

    def _beat(self) -> None:
        state = "active" if self.is_active() else "idle"
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "state": state}).encode()
        try:
            if "://" not in self.folder:
                os.makedirs(self.folder, exist_ok=True)
            with FileSystems.create(self._path(state)) as f:
                f.write(body)
            if self._state is not None and self._state != state:
                FileSystems.delete([self._path(self._state)])
            self._state = state
        except Exception as e:  # noqa: BLE001 - a missed heartbeat only makes others' shares larger for a while
            log.warning("LLM budget heartbeat in %s not written: %s", self.folder, e)

    def refresh(self) -> None:
        try:
            found = FileSystems.match([f"{self.folder}/*{HEARTBEAT_SUFFIX}"])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - keep the last view
            log.warning("LLM budget members in %s not listed: %s", self.folder, e)
            return
        now = time.time()
        active = set()
        for m in found:
            name = m.path.rsplit("/", 1)[-1][: -len(HEARTBEAT_SUFFIX)]
            member, _, state = name.rpartition(".")
            fresh = not m.last_updated_in_seconds or now - m.last_updated_in_seconds < STALE_PERIODS * self.refresh_s
            if fresh and state == "active":
                active.add(member)
        active.discard(self.id)
        with self._lock:
            self._active = sorted(active | {self.id})

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.beat()
            self.refresh()

    def settling(self) -> bool:
        return time.monotonic() < self._settle_until

    def share(self, total: float, whole: bool = True) -> float:
        """This member's part of `total` (it counts itself as sending): whole numbers that
        add up to `total` when `whole`."""
        with self._lock:
            members = list(self._active)
        first = time.monotonic() - self.joined < SETTLE_PERIODS * self.refresh_s
        n = max(len(members), self.expected if first else 1)
        if not whole:
            return total / n
        rank = members.index(self.id)
        return total // n + (1 if rank < total % n else 0)

    @property
    def members(self) -> int:
        with self._lock:
            return len(self._active)

    def leave(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            with self._beat_lock:
                if self._state is not None:
                    FileSystems.delete([self._path(self._state)])
        except Exception:  # noqa: BLE001 - goes stale on its own
            pass


class _Bucket:
    """Generic cell rate pacing: a take of `n` is allowed `burst` seconds' worth ahead of
    the theoretical schedule at `rate()` per second (the rate may change). With burst 0
    requests go evenly spaced, as a server that counts in a sliding window wants them; a
    take larger than the burst waits for its own time only, so a large request is never
    refused forever."""

    def __init__(self, rate, burst_s: float = 0.0):
        self.rate = rate
        self.burst_s = burst_s
        self.next_at = 0.0  # monotonic time when the schedule is free again
        self._lock: Optional[asyncio.Lock] = None

    async def take(self, n: float) -> float:
        """Wait until `n` may go; returns the seconds waited."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        waited = 0.0
        async with self._lock:
            while True:
                rate = self.rate()
                if rate <= 0:
                    return waited
                now = time.monotonic()
                start = max(self.next_at, now - self.burst_s)
                if start - self.burst_s <= now:
                    self.next_at = start + n / rate
                    return waited
                pause = min(start - self.burst_s - now, 1.0)  # the rate may change meanwhile
                waited += pause
                await asyncio.sleep(pause)

    def give_back(self, n: float) -> None:
        rate = self.rate()
        if rate > 0:
            self.next_at -= n / rate


class Budget:
    """The send side of one process: concurrency share, rate buckets and the slow-down
    controller. Lives on the endpoint's event loop (one per process)."""

    def __init__(self, spec: BudgetSpec, registry: Optional[Registry] = None):
        self.spec = spec
        self.registry = registry
        self.in_flight = 0
        self._cond: Optional[asyncio.Condition] = None
        self._paced: Optional[float] = None  # req/s after a slow-down; None = not paced
        self._last_decrease = float("-inf")
        self._refusals: deque[float] = deque()  # refusal times in the last SHARE_WINDOW_S
        self._slow_start = False  # cut with nothing answered: double each second until the next cut
        self._last_near = float("-inf")  # last time refusals said the limit was near
        self._last_increase = time.monotonic()
        self._answered: deque[float] = deque()
        self._answered_ever = False
        self._first_answer = 0.0
        self.rate_limited = 0
        self.waiting = 0
        if registry is not None:
            registry.busy.append(lambda: self.waiting > 0 or self.in_flight > 0)
        self.requests = _Bucket(self.request_rate)
        self.tokens = _Bucket(self.token_rate, burst_s=BURST_S)

    # -- shares -------------------------------------------------------------------------
    def concurrency(self) -> int:
        limit = self.spec.max_concurrency
        if self.spec.total_concurrency and self.registry is not None:
            limit = min(limit, max(1, int(self.registry.share(self.spec.total_concurrency))))
        return max(1, limit)

    def configured_rate(self) -> float:
        if not self.spec.requests_per_minute:
            return 0.0
        share = self.spec.requests_per_minute / 60.0
        return self.registry.share(share, whole=False) if self.registry is not None else share

    def token_rate(self) -> float:
        if not self.spec.tokens_per_minute:
            return 0.0
        share = self.spec.tokens_per_minute / 60.0
        factor = 1.0
        if self._paced is not None and self.configured_rate():
            factor = min(1.0, self._paced / self.configured_rate())
        return (self.registry.share(share, whole=False) if self.registry is not None else share) * factor

    def request_rate(self) -> float:
        self._grow()
        configured = self.configured_rate()
        if self._paced is None:
            return configured
        return min(self._paced, configured) if configured else self._paced

    # -- the controller -----------------------------------------------------------------
    def _answered_rate(self, now: float, span: float = 2.0) -> float:
        recent = sum(1 for t in self._answered if now - t < span)
        if not recent:
            return 0.0
        # Over the whole span, or since the first answer of all when that is more recent.
        return recent / max(0.5, min(span, now - self._first_answer))

    def _grow(self) -> None:
        """Once a second: INCREASE a second for FAST_AFTER_S seconds after a cut and while
        refusals are MIN_SHARE or more of the recent tries (near the limit: it is probed
        slowly, so an overshoot is small), FAST_INCREASE a second after that, doubling
        once SEARCH_AFTER_S passed so (the limit went up, or the other senders went away),
        and doubling after a cut that came before any answer (from the floor, until the
        next cut: TCP's slow start). Back at the configured rate, the plain bucket again."""
        now = time.monotonic()
        if self._paced is None or now - self._last_increase < 1.0:
            return
        seconds = now - self._last_increase
        self._last_increase = now
        if now - self._last_decrease < FAST_AFTER_S or self._recent(now)[2] >= MIN_SHARE:
            self._last_near = now
        quiet = now - self._last_near
        if self._slow_start or quiet >= SEARCH_AFTER_S:
            factor = 2.0
        elif quiet < FAST_AFTER_S:
            factor = 1 + INCREASE
        else:
            factor = 1 + FAST_INCREASE
        self._paced = min(MAX_RATE_PER_S, self._paced * factor ** min(seconds, 60.0))
        configured = self.configured_rate()
        if configured and self._paced >= configured:
            self._paced = None

    def _recent(self, now: float) -> tuple[int, int, float]:
        """Refusals, answers and the refused share of the tries in the last SHARE_WINDOW_S."""
        while self._refusals and now - self._refusals[0] >= SHARE_WINDOW_S:
            self._refusals.popleft()
        refused = len(self._refusals)
        answered = sum(1 for t in self._answered if now - t < SHARE_WINDOW_S)
        return refused, answered, refused / max(1, refused + answered)

    def on_answer(self) -> None:
        if not self._answered_ever:
            self._first_answer = time.monotonic()
        self._answered_ever = True
        now = time.monotonic()
        self._answered.append(now)
        while now - self._answered[0] >= SHARE_WINDOW_S:  # the longest window looked at
            self._answered.popleft()

    def on_rate_limited(self) -> None:
        """A 429/503: send at DECREASE of the rate this process was answered at (at most
        once in DECREASE_EVERY_S); with nothing answered, halve the pace (or fall to the floor)."""
        self.rate_limited += 1
        now = time.monotonic()
        self._refusals.append(now)
        refused, answered_recently, share = self._recent(now)
        since = now - self._last_decrease
        # A refusal in a steady stream of answers (a provider's 429s are not all about our
        # rate) is waited out, not cut for; a real overshoot (a quarter or more of the
        # tries refused, as at start-up when nothing is known) is cut again after a
        # second, not five.
        dense = refused >= DENSE_REFUSALS and share >= DENSE_SHARE
        lone = refused < 2 and answered_recently > 0
        if lone or share < MIN_SHARE or (since < DECREASE_EVERY_S and not (dense and since >= 1.0)):
            return
        self._last_decrease = now
        self._last_increase = now
        answered = self._answered_rate(now)
        self._slow_start = answered <= 0
        if answered > 0:
            paced = DECREASE * answered
        elif self._paced is not None:
            paced = 0.5 * self._paced
        else:
            paced = MIN_RATE_PER_S
        current = self.request_rate()
        if current:
            paced = min(paced, current)
        self._paced = max(MIN_RATE_PER_S, paced)
        log.info("rate limited: sending at most %.2f requests/s from this process", self._paced)

    # -- sending ------------------------------------------------------------------------
    async def settle(self) -> None:
        """A new member waits one period, so the members already running see it first."""
        while self.registry is not None and self.registry.settling():
            await asyncio.sleep(min(0.2, self.registry.refresh_s))

    async def acquire(self, tokens: float) -> float:
        """Wait for a slot, a request and `tokens` tokens; returns the seconds waited."""
        if self._cond is None:
            self._cond = asyncio.Condition()
        started = time.monotonic()
        if self.registry is not None:
            self.registry.want()
        self.waiting += 1
        try:
            await self.settle()
            async with self._cond:
                while self.in_flight >= self.concurrency():
                    try:
                        # Shares change when members come and go: look again now and then.
                        await asyncio.wait_for(self._cond.wait(), timeout=0.5)
                    except TimeoutError:
                        pass
                self.in_flight += 1
        finally:
            self.waiting -= 1
        try:
            await self.requests.take(1)
            if self.spec.tokens_per_minute:
                await self.tokens.take(tokens)
        except BaseException:
            await self.release()
            raise
        return time.monotonic() - started

    async def release(self, estimated_tokens: float = 0.0, actual_tokens: Optional[float] = None) -> None:
        if self.spec.tokens_per_minute and actual_tokens is not None:
            self.tokens.give_back(estimated_tokens - actual_tokens)
        if self.registry is not None:
            self.registry.touch()
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify()


_REGISTRIES: dict[str, Registry] = {}
_REG_LOCK = threading.Lock()


def registry_for(spec: BudgetSpec) -> Optional[Registry]:
    """The process's membership in the job's budget folder (one per folder per process)."""
    if not spec.job_wide or not spec.registry:
        return None
    with _REG_LOCK:
        reg = _REGISTRIES.get(spec.registry)
        if reg is None:
            reg = _REGISTRIES[spec.registry] = Registry(spec.registry, spec.refresh_s, spec.expected_members)
        return reg
