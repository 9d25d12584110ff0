"""How long an idle engine gathers a burst (engine.arrivals): the policy on a fake clock, then its
wiring in a real engine (SmolLM2, the bundled GGUF)."""

from __future__ import annotations

import asyncio

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
