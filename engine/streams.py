"""RequestStream: one request's outputs, read on the caller's event loop.

The engine's loop thread merges each step's outputs into their streams itself (`deliver`, under
the stream's lock): outputs the reader has not taken yet are merged into one (vLLM's output
collector does the same), so a reader slower than the engine gets bigger deltas, never a growing
queue. The loop thread wakes a reader's event loop (`AsyncEngine._deliver`: one hop per event
loop and step, `wake_all`) only for a stream that is ready for a reader that waits.

A reader that sends each delta over a costly hop (a model replica streaming to the router) reads
with `next_output(not_before)`: until `not_before` only a last output or an error is ready, so
the loop thread merges the steps in between and wakes nobody; the reader's own timer wakes it when
its window ends (on one grid for every stream: deployments.model_server.window_end, so one
event-loop wake-up serves them all), and a stream with nothing to send then is woken by the first
step after. So a stream's reader wakes once per window instead of once per step, and the
replica's event loop does not run every step for every stream: it shares the GIL with the
engine's loop thread, whose steps each of its wake-ups would slow down.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol

from .chat_format import OutputFormat
from .request import RequestOutput


class Aborts(Protocol):
    """What a stream needs of its engine (engine.engine.AsyncEngine)."""

    def abort(self, request_id: str) -> None: ...


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(
        self, engine: Aborts, request_id: str, prompt_ids: list[int], output_format: OutputFormat | None = None
    ):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.format = output_format or OutputFormat()  # how its output is written (engine.chat_format)
        self.prompt_tokens = len(prompt_ids)
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # the engine's thread and the reader's loop share what follows
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._not_before = 0.0  # time.monotonic() before which the reader takes only a last output
        self._waiting = False  # the reader waits: wake it once the stream is ready
        self._armed = False  # ...and its timer will wake it when its window ends
        self._waiter: asyncio.Future | None = None  # the reader's, on its loop only
        self.finished = False
        self.admitted_at: float | None = None  # time.time() when the loop thread took it (hop timing)
        self.admitted_step: int | None = None  # AsyncEngine.steps by then

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        return await self.next_output()

    def deliver(self, item: RequestOutput | BaseException) -> bool:
        """Merge an output (or set the error) from any thread. True when the reader waits and is
        now ready: the caller wakes it on its loop (`wake`), once."""
        with self._lock:
            if isinstance(item, BaseException):
                self._error = item
            elif self._pending is None:
                self._pending = item
            else:
                self._pending = _merge(self._pending, item)
            if self._waiting and (self._final() or (self._ready() and not self._armed)):
                self._waiting = False
                return True
            return False

    def put(self, item: RequestOutput | BaseException) -> None:
        """`deliver` on the stream's own event loop."""
        if self.deliver(item):
            self.wake()

    def wake(self) -> None:
        """On the stream's loop: let the reader look again (a spurious wake-up only costs a look)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _window_ended(self) -> None:
        """The reader's timer, on its loop: the window is over, output merged during it can go."""
        with self._lock:
            self._armed = False
        self.wake()

    def _final(self) -> bool:  # under the lock: what goes at once, window or not
        return self._error is not None or (self._pending is not None and self._pending.finished)

    def _ready(self) -> bool:  # under the lock
        if self._final():
            return True
        return self._pending is not None and time.monotonic() >= self._not_before

    async def next_output(self, not_before: float = 0.0) -> RequestOutput:
        """The output produced since the last read, merged. Before `not_before` (time.monotonic())
        only a last output or an error is taken at once; anything else waits for the window's end.
        Raises StopAsyncIteration after the last output, or the request's error once the output
        before it was read. Cancelling the read aborts the request."""
        if self.finished:
            raise StopAsyncIteration
        while True:
            with self._lock:
                self._not_before = not_before
                if self._ready():
                    item, self._pending, error = self._pending, None, self._error
                    break
                self._waiting = True
                window = not_before - time.monotonic()  # the timer wakes the reader at its end;
                self._armed = window > 0  # past it, the engine's thread does, at the next output
            self._waiter = self._loop.create_future()
            timer = self._loop.call_later(window, self._window_ended) if window > 0 else None
            try:
                await self._waiter
            except asyncio.CancelledError:
                self._engine.abort(self.request_id)
                raise
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
                with self._lock:
                    self._waiting = self._armed = False
        if item is None:  # only an error is left: what was produced before it came first
            self.finished = True
            raise error
        if item.finished:
            self.finished = True
        return item

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two deltas of one request as one (b came after a)."""
    logprobs = (a.logprobs or []) + (b.logprobs or []) if a.logprobs is not None or b.logprobs is not None else None
    return RequestOutput(
        a.request_id,
        a.text + b.text,
        a.token_ids + b.token_ids,
        finish_reason=b.finish_reason,
        usage=b.usage,
        first_token_time=a.first_token_time or b.first_token_time,
        created=a.created,
        logprobs=logprobs,
        stop_sequence=b.stop_sequence,
    )


def post(loop, fn, *args) -> bool:
    """Run fn(*args) on a stream's event loop (from the engine's thread); False when that loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def wake_all(streams) -> None:
    """Wake the readers of streams that became ready in one step: runs on their event loop."""
    for stream in streams:
        stream.wake()
