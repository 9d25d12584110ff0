"""Watching an engine while it runs, for the benchmarks that measure what it holds."""

from __future__ import annotations


def after_each_step(scheduler, fn) -> None:
    """Call `fn()` after every step of an engine's scheduler (on the engine's thread)."""
    inner = scheduler.step

    def step():
        out = inner()
        fn()
        return out

    scheduler.step = step
