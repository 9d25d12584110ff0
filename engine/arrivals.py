"""How long an idle engine loop gathers requests before its first step.

Woken from idle by a request, the loop keeps taking requests while each next one follows within a
*gap*, for a *window* at most, so that requests sent together share one prompt chunk and one
decode step. Every request admitted a step later costs a step that takes newcomers (a prompt
chunk plus the first decode of a changed batch, which holds back the rows already decoding), and
through `serve run` a burst reaches the engine spread over milliseconds (the router, the handle
hop).

The gap is short (`ARRIVAL_GAP_S`) for a lone request, which waits it in full. It is longer
(`BURST_GAP_S`) once the traffic comes in bursts: in this gathering after a second request, or
from the start when more than one request arrived within the window of the last wake-up (seen by
the steps that followed it).

On CUDA a batch whose rows joined at different steps is padded for as long as they all run, and a
padded decode step is slower there (MLX's fused attention kernel takes no array mask), so a burst
split over two steps costs more than its join step. The defaults are what admitted `serve run`'s
bursts in one step on an H100 (the lab notebook's *A burst in one step*).

`ORCHARD_ARRIVAL_GAP_MS`, `ORCHARD_BURST_GAP_MS` and `ORCHARD_ARRIVAL_WINDOW_MS` in a replica's
environment set them (for measuring them).
"""

from __future__ import annotations

import os

ARRIVAL_GAP_S = float(os.environ.get("ORCHARD_ARRIVAL_GAP_MS", "0.5")) / 1000
BURST_GAP_S = float(os.environ.get("ORCHARD_BURST_GAP_MS", "5")) / 1000
ARRIVAL_WINDOW_S = float(os.environ.get("ORCHARD_ARRIVAL_WINDOW_MS", "150")) / 1000


class ArrivalGather:
    """The gathering of one engine loop: `wake(now)` when a request wakes it from idle (not another
    message, such as a router's query of the cache, which would reset what the last burst taught),
    `arrived(now)` for every request taken (the waking one included, and those taken by later
    steps), `gap(now)`: how long to wait for the next one now (0: stop gathering)."""

    def __init__(
        self, gap_s: float = ARRIVAL_GAP_S, burst_gap_s: float = BURST_GAP_S, window_s: float = ARRIVAL_WINDOW_S
    ):
        self.gap_s, self.burst_gap_s, self.window_s = gap_s, burst_gap_s, window_s
        self.woke_at: float | None = None
        self.in_window = 0  # requests that arrived within the window of the last wake-up
        self.bursty = False  # the wake-up before this one was a burst

    def wake(self, now: float) -> None:
        self.bursty = self.in_window > 1
        self.woke_at, self.in_window = now, 0

    def arrived(self, now: float) -> None:
        if self.woke_at is not None and now - self.woke_at <= self.window_s:
            self.in_window += 1

    def gap(self, now: float) -> float:
        if self.woke_at is None:
            return 0.0
        left = self.woke_at + self.window_s - now
        gap = self.burst_gap_s if self.bursty or self.in_window > 1 else self.gap_s
        return max(0.0, min(gap, left))
