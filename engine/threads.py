"""Threads that run MLX work, and how they end without taking the process down.

`Thread.join` returns before the OS thread runs its thread-local destructors, and MLX's take the
GIL: if the interpreter is finalizing by then, CPython ends that thread from inside a C++
destructor and the process aborts ('terminate called without an active exception'), seen at the
exit of a process that stopped an MLX thread on a busy machine. So whoever stops such a thread
waits for its OS thread to be gone (`wait_until_gone`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

GIL_SWITCH_ENV = "ORCHARD_GIL_SWITCH_INTERVAL_MS"
GIL_SWITCH_MS = 0.0  # Python's own: a shorter one measured no gain (the lab notebook, issue 36)


def share_gil_with_engine() -> float:
    """Shorten Python's GIL switch interval in a process whose engine loop thread shares the GIL
    with an event loop (a model replica: Ray Serve's loop relays the streams). Every step, the loop
    thread drops the GIL while MLX evaluates, and then needs it back; it may wait up to the switch
    interval for a busy event loop to let go, which on a GPU is as long as a decode step.
    `ORCHARD_GIL_SWITCH_INTERVAL_MS` sets it (0, the default: Python's own). Returns the interval
    in force, in seconds."""
    ms = float(os.environ.get(GIL_SWITCH_ENV, GIL_SWITCH_MS))
    if ms > 0:
        sys.setswitchinterval(ms / 1000.0)
    return sys.getswitchinterval()


def wait_until_gone(native_id: int | None, timeout: float = 2.0) -> None:
    """Wait for a joined thread's OS thread to end. Linux names live threads in /proc/self/task;
    elsewhere a short sleep lets the destructors run."""
    task = f"/proc/self/task/{native_id}"
    if native_id is None or not os.path.isdir("/proc/self/task"):
        time.sleep(0.05)
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.002)


class MlxWorker:
    """One thread for a caller's MLX work, one call at a time (an event loop hands it blocking
    engine calls: `loop.run_in_executor(worker.executor, ...)`), that ends cleanly."""

    def __init__(self, name: str):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._native_id = self.executor.submit(threading.get_native_id).result()

    def submit(self, fn, *args) -> Future:
        return self.executor.submit(fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        """Stop after the running call; `wait`: until the OS thread is gone too."""
        self.executor.shutdown(wait=wait, cancel_futures=True)
        if wait:
            wait_until_gone(self._native_id)
