"""How long an idle engine gathers a burst (engine.arrivals): the policy on a fake clock, then its
wiring in a real engine (SmolLM2, the bundled GGUF)."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine.arrivals import ArrivalGather
from engine.config import EngineConfig
from engine.engine import AsyncEngine
from engine.sampling import SamplingParams

from ..conftest import SMOLLM
from .helpers import chat, collect

MS = 0.001


def gathered(policy: ArrivalGather, start: float, offsets_ms: list[float]) -> int:
    """How many of the requests arriving at `offsets_ms` after `start` one gathering takes (the
    first wakes the loop); the rest arrive after it, within the window or not (the steps' drains)."""
    policy.wake(start)
    policy.arrived(start)
    taken, last = 1, start
    for offset in offsets_ms[1:]:
        now = start + offset * MS
        if now - last > policy.gap(last):  # the gap ran out first: the gathering ended
            break
        policy.arrived(now)
        taken, last = taken + 1, now
    for offset in offsets_ms[taken:]:
        policy.arrived(start + offset * MS)
    return taken


def test_a_lone_request_waits_the_short_gap_and_a_burst_the_long_one():
    policy = ArrivalGather(gap_s=0.5 * MS, burst_gap_s=2 * MS, window_s=25 * MS)
    for t in range(3):  # one user, one request at a time
        assert gathered(policy, 10.0 * t, [0]) == 1
        assert policy.gap(10.0 * t) == pytest.approx(0.5 * MS)
    # requests 1 ms apart: the short gap misses the second, and the requests after it are counted
    assert gathered(policy, 40.0, [0, 1, 2, 3, 4]) == 1
    # so the next wake-up gathers with the long gap: the whole wave in one step
    assert gathered(policy, 50.0, [0, 1, 2, 3, 4]) == 5
    assert policy.gap(50.0 + 4 * MS) == pytest.approx(2 * MS)
    # within a gathering, a second request within the short gap switches to the long one
    fresh = ArrivalGather(gap_s=0.5 * MS, burst_gap_s=2 * MS, window_s=25 * MS)
    assert gathered(fresh, 0.0, [0, 0.3, 1.8, 3.5]) == 4


def test_the_window_bounds_a_gathering_and_lone_traffic_returns_to_the_short_gap():
    policy = ArrivalGather(gap_s=0.5 * MS, burst_gap_s=2 * MS, window_s=25 * MS)
    assert gathered(policy, 0.0, [0, 0.2, 0.4]) == 3
    # a steady trickle 1.5 ms apart: the window (25 ms) ends the gathering
    assert gathered(policy, 10.0, [1.5 * i for i in range(30)]) == 17
    assert policy.gap(10.0 + 25 * MS) == 0.0
    assert gathered(policy, 20.0, [0]) == 1  # bursty before: it waited the long gap, in vain
    assert gathered(policy, 30.0, [0]) == 1
    assert policy.gap(30.0) == pytest.approx(0.5 * MS)  # and learnt that the burst is over


async def test_the_engine_starts_a_gathering_only_for_a_request_and_counts_every_request(load_once):
    """The wiring, on a real engine: a message that is not a request (here a cache clear) wakes the
    idle loop without starting a gathering, which would reset what the last burst taught; each
    request is counted. (How many steps a burst takes depends on the sender's timing, so the
    gathering itself is tested above, on a fake clock.)"""
    calls: list[str] = []

    class Recording(ArrivalGather):
        def wake(self, now: float) -> None:
            calls.append("wake")
            super().wake(now)

        def arrived(self, now: float) -> None:
            calls.append("arrived")
            super().arrived(now)

    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=64))
    eng._arrivals = Recording()
    try:
        eng.clear_cache()
        await asyncio.sleep(0.2)  # the idle loop takes it: no gathering
        params = SamplingParams(temperature=0, max_tokens=3)
        streams = [eng.submit(chat(f"Question {i}: name a colour."), params) for i in range(4)]
        await asyncio.gather(*(collect(s) for s in streams))
        assert calls[:2] == ["wake", "arrived"], calls
        assert calls.count("arrived") == 4 and 1 <= calls.count("wake") <= 4, calls
    finally:
        eng.shutdown()


def spread_burst(n: int, seed: int) -> list[float]:
    """Arrival offsets (ms) of an n-request burst as `serve run` delivers one to a replica: a request
    every ~1.5 ms, every eighth after a 3.5-4.5 ms hiccup (the replica's GIL, Ray's threads)."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(n):
        offsets.append(t)
        t += rng.uniform(3.5, 4.5) if i % 8 == 7 else rng.uniform(0.8, 2.2)
    return offsets


def test_the_defaults_take_a_spread_burst_in_one_step_and_the_old_ones_did_not():
    """A 64-request burst spread over ~120 ms with a few gaps of ~4 ms: the defaults (a 5 ms gap in
    a burst, 150 ms at most) gather all of it, so its rows share one step and none is padded; the
    previous defaults (2 ms, 25 ms) admitted a part and left the rest to later steps."""
    for seed in range(5):
        burst = spread_burst(64, seed)
        assert 90 < burst[-1] < 150
        policy = ArrivalGather()  # this module's defaults
        assert gathered(policy, 0.0, [0]) == 1  # a lone request first: not bursty yet
        assert gathered(policy, 1.0, [0, 0.3]) == 2
        assert gathered(policy, 2.0, burst) == 64
        old = ArrivalGather(gap_s=0.5 * MS, burst_gap_s=2 * MS, window_s=25 * MS)
        gathered(old, 1.0, [0, 0.3])
        assert gathered(old, 2.0, burst) < 20


def test_the_window_still_bounds_an_endless_burst():
    policy = ArrivalGather()
    gathered(policy, 0.0, [0, 0.3])
    trickle = [1.0 * i for i in range(400)]  # a request a millisecond, for 400 ms
    assert gathered(policy, 1.0, trickle) == 151  # 0..150 ms: the window's
    assert policy.gap(1.0 + 150 * MS) == 0.0
