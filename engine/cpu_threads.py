"""OpenBLAS's thread count, chosen from what else is running on the machine.

On the CPU fast path every matmul is an OpenBLAS GEMM split over its threads, which meet at a
barrier: when another busy process takes one of the cores, the GEMM's other threads wait for it.
Two models busy at once on 2 cores, each with 2 threads, run slower than when each leaves the
other a core (docs/lab-notebook.md, *OpenBLAS threads chosen from what runs*). One model busy alone
wants every core. So while the engine is busy, once a second, `BlasThreads.tick` measures the cores
that other processes used (the machine's busy CPU time minus this process's) and gives OpenBLAS
the cores they left: from 1 up to the threads it started with (OPENBLAS_NUM_THREADS caps it).

The threads are set through threadpoolctl, between steps, when no GEMM is in flight.
"""

from __future__ import annotations

import logging
import os
import time

import mlx.core as mx
import psutil

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # how often the choice is made while busy
STALE_S = 3.0  # a longer gap (the engine was idle) starts a new measurement instead


class BlasThreads:
    """Chooses OpenBLAS's threads for this process from the cores others leave free."""

    def __init__(self, controller, max_threads: int, cores: int):
        self._controller = controller
        self.max_threads = max_threads
        self.cores = cores
        self.threads = max_threads
        self._pending: int | None = None  # a new choice waits for a second tick that agrees
        self._process = psutil.Process()
        self._sample: tuple[float, float, float] | None = None

    @classmethod
    def for_this_process(cls) -> BlasThreads | None:
        """None unless OpenBLAS is loaded with more than one thread (nothing to choose).

        The OpenBLAS MLX calls is the one preloaded (`libopenblas`), not NumPy's own copy
        (`libscipy_openblas`, which a Ray worker starts with one thread).
        """
        from threadpoolctl import ThreadpoolController

        controller = ThreadpoolController().select(prefix="libopenblas")
        if not controller.lib_controllers:
            log.info("OpenBLAS is not loaded: no threads to choose")
            return None
        threads = controller.info()[0]["num_threads"]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if threads < 2 or cores < 2:
            log.info("OpenBLAS has %d thread(s) on %d core(s): no threads to choose", threads, cores)
            return None
        log.info("OpenBLAS: up to %d threads on %d cores, chosen while busy from what else runs", threads, cores)
        return cls(controller, threads, cores)

    def _read(self) -> tuple[float, float, float]:
        """(wall, the machine's busy CPU seconds, this process's CPU seconds)."""
        machine = psutil.cpu_times()
        own = self._process.cpu_times()
        return time.monotonic(), sum(machine) - machine.idle - getattr(machine, "iowait", 0.0), own.user + own.system

    def others_cores(self, now: tuple[float, float, float]) -> float | None:
        """Cores other processes used since the last sample; None when there is none to compare."""
        last, self._sample = self._sample, now
        if last is None or now[0] - last[0] > STALE_S or now[0] <= last[0]:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))

    def choose(self, others: float) -> int:
        """The threads for the cores others leave; a core counts as taken once others use more than
        half of it. A busy neighbour reads as less than a core while our threads compete with it
        (one busy loop beside a two-thread engine on 2 cores: 0.62), and a light one, such as Ray
        Serve's own processes (0.17-0.24 of a core while serving), does not count."""
        return max(1, min(self.max_threads, int(self.cores - others + 0.5)))

    def restore(self) -> None:
        """OpenBLAS's threads back to what they were at the start, when the engine is done: the
        setting is the process's, and its next user (another engine, NumPy) finds it as this one did."""
        if self.threads != self.max_threads:
            mx.synchronize()
            self._controller.limit(limits=self.max_threads)
            self.threads, self._pending = self.max_threads, None

    def tick(self) -> None:
        """Called by the engine loop between steps while it is busy; cheap unless a second passed."""
        if self._sample is not None and time.monotonic() - self._sample[0] < INTERVAL_S:
            return
        others = self.others_cores(self._read())
        if others is None:
            return
        target = self.choose(others)
        if target == self.threads:
            self._pending = None
            return
        if self._pending != target:  # one reading is not enough: wait for the next to agree
            self._pending = target
            return
        mx.synchronize()  # no GEMM may be running while OpenBLAS changes its threads
        self._controller.limit(limits=target)
        log.info(
            "OpenBLAS threads %d -> %d (other processes used %.2f of %d cores)",
            self.threads,
            target,
            others,
            self.cores,
        )
        self.threads, self._pending = target, None
