"""OpenBLAS's threads chosen from what else runs (engine/cpu_threads.py): the choice on scripted
CPU readings, then the real engine on the CPU fast path beside real busy processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy  # noqa: F401 - its own OpenBLAS copy, loaded as in a model replica
import pytest
from threadpoolctl import ThreadpoolController, threadpool_info

from engine.config import EngineConfig
from engine.cpu_threads import BlasThreads
from engine.engine import AsyncEngine
from engine.request import PromptInput
from engine.sampling import SamplingParams

from ..conftest import SMOLLM


class FakeController:
    def __init__(self):
        self.limits: list[int] = []

    def limit(self, limits):
        self.limits.append(limits)


def scripted(readings, max_threads=2, cores=2) -> tuple[BlasThreads, FakeController]:
    """A BlasThreads whose CPU readings are (wall, machine busy s, own s) from `readings`."""
    controller = FakeController()
    blas = BlasThreads(controller, max_threads, cores)
    it = iter(readings)
    blas._read = lambda: next(it)
    return blas, controller


def test_the_choice_leaves_the_cores_others_use():
    blas, _ = scripted([])
    # more than half a core taken counts: a busy neighbour reads as ~0.6 while our threads compete
    assert [blas.choose(x) for x in (0.0, 0.24, 0.45, 0.62, 0.8, 1.3, 2.0)] == [2, 2, 2, 1, 1, 1, 1]
    assert BlasThreads(FakeController(), 4, 8).choose(1.0) == 4  # never above what OpenBLAS started with


def test_a_change_needs_two_readings_that_agree_and_an_idle_gap_starts_over():
    # wall, machine busy, own: the engine uses 1 core; others 1 core, 1 core, then 0.1 after a gap
    blas, ctl = scripted(
        [(0, 0, 0), (1, 2, 1), (2, 4, 2), (10, 5, 2.5), (11, 6.1, 3.5), (12, 7.2, 4.5), (13, 8.3, 5.5)]
    )
    blas.tick()  # the first reading: nothing to compare
    blas.tick()  # others 1.0: one reading for 1 thread
    assert ctl.limits == [] and blas.threads == 2
    blas.tick()  # the second agrees
    assert ctl.limits == [1] and blas.threads == 1
    blas.tick()  # 8 s later: the engine was idle, a new measurement starts
    blas.tick(), blas.tick()  # others 0.1 twice: the cores are free again
    assert ctl.limits == [1, 2] and blas.threads == 2
    blas.tick()  # still free: nothing changes
    assert ctl.limits == [1, 2]


def test_a_finished_engine_leaves_openblas_as_it_found_it():
    """The thread count is the process's: an engine that lowered it gives it back when it ends
    (a lowered count left behind made the next engine in a test worker skip its thread tests)."""
    blas, ctl = scripted([(0, 0, 0), (1, 2, 1), (2, 4, 2)])
    blas.restore()  # nothing lowered: nothing to do
    blas.tick(), blas.tick(), blas.tick()
    assert ctl.limits == [1] and blas.threads == 1
    blas.restore()
    assert ctl.limits == [1, 2] and blas.threads == 2


def spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


async def busy_until(engine: AsyncEngine, threads: int, timeout_s: float = 40.0) -> int:
    """Keep the engine decoding until its OpenBLAS threads are `threads` (or the time is up)."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async for _ in engine.submit(PromptInput(messages=[{"role": "user", "content": "Count to ten."}]), params):
            pass
        await asyncio.sleep(0.25)  # stats are published at most every 0.25 s
        if engine.stats()["cpu_threads"] == threads:
            break
    return engine.stats()["cpu_threads"]


def mlx_blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpool_info() if i["prefix"] == "libopenblas"}


def test_the_openblas_mlx_calls_is_the_one_chosen_not_numpys():
    """A Ray worker's NumPy copy starts with 1 thread; listed first, it once hid MLX's 2 threads."""
    numpys = ThreadpoolController().select(prefix="libscipy_openblas")
    with numpys.limit(limits=1):
        blas = BlasThreads.for_this_process()
        if blas is None:
            pytest.skip("needs OpenBLAS loaded with 2+ threads on 2+ cores (the CPU fast path)")
        assert {i["prefix"] for i in blas._controller.info()} == {"libopenblas"}
        assert blas.max_threads >= 2


async def test_the_engine_gives_openblas_the_cores_other_processes_leave(load_once):
    if BlasThreads.for_this_process() is None:
        pytest.skip("needs OpenBLAS loaded with 2+ threads on 2+ cores (the CPU fast path)")
    engine = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=64))
    others = spinners(2)
    try:
        assert await busy_until(engine, 1) == 1
        assert mlx_blas_threads() == {1}
    finally:
        for p in others:
            p.kill()
            p.wait()
    try:
        before = others_cpu()
        got = await busy_until(engine, 2, timeout_s=15.0)  # ~2 s once the cores are free; else a skip below
        busy, running = others_cpu(before), mlx_blas_threads()
    finally:
        engine.shutdown()
    assert mlx_blas_threads() == {2}, "a finished engine leaves OpenBLAS as it found it"
    if got != 2 and busy > 0.5:  # xdist's other worker (an e2e `serve run`) holds a core: 1 is right
        pytest.skip(f"other processes used {busy:.2f} of the cores while the engine waited for 2 threads")
    assert got == 2 and running == {2}


def others_cpu(since: tuple[float, float, float] | None = None):
    """(wall, machine busy s, this process's s) now; with `since`: the cores other processes used
    on average since then (as engine.cpu_threads reads them)."""
    import psutil

    times, own = psutil.cpu_times(), psutil.Process().cpu_times()
    now = (time.monotonic(), sum(times) - times.idle - getattr(times, "iowait", 0.0), own.user + own.system)
    if since is None:
        return now
    return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / max(1e-6, now[0] - since[0])
