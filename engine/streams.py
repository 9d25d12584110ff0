"""RequestStream: one request's outputs, read on the caller's event loop.

The engine's loop thread posts each step's outputs to the streams' event loop (one thread hop
per step, `AsyncEngine._deliver`); `put` runs there. Outputs the reader has not taken yet are
merged into one (vLLM's output collector does the same): a reader slower than the engine gets
bigger deltas, never a growing queue.

A reader that sends each delta over a costly hop (a model replica streaming to the router) reads
with `next_output(not_before)`: it is woken once the window has passed and output is waiting, or
at once for the last output or an error, and not for every step in between. With 64 streams and
a step every 15 ms, that is one wake-up per stream per window instead of one per step: the event
loop stays idle, and it shares the GIL with the engine's loop thread, whose steps it would
otherwise slow down.
"""

from __future__ import annotations

import asyncio
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
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future | None = None  # the reader, while it waits
        self._not_before = 0.0  # time.monotonic() before which the reader takes only a last output
        self._timer: asyncio.TimerHandle | None = None
        self.finished = False
        self.admitted_at: float | None = None  # time.time() when the loop thread took it (hop timing)
        self.admitted_step: int | None = None  # AsyncEngine.steps by then

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        return await self.next_output()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Runs on the stream's event loop (the engine posts it there)."""
        if isinstance(item, BaseException):
            self._error = item
        elif self._pending is None:
            self._pending = item
        else:
            self._pending = _merge(self._pending, item)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._ready():
            waiter.set_result(None)
        elif self._timer is None:  # output waits for the window: one wake-up when it ends
            self._timer = self._loop.call_later(self._not_before - time.monotonic(), self._wake)

    def _ready(self) -> bool:
        if self._error is not None:
            return True
        if self._pending is None:
            return False
        return self._pending.finished or time.monotonic() >= self._not_before

    def _wake(self) -> None:
        self._timer = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_output(self, not_before: float = 0.0) -> RequestOutput:
        """The output produced since the last read, merged. Before `not_before` (time.monotonic())
        only a last output or an error is taken at once; anything else waits for the window's end.
        Raises StopAsyncIteration after the last output, or the request's error once the output
        before it was read. Cancelling the read aborts the request."""
        if self.finished:
            raise StopAsyncIteration
        self._not_before = not_before
        while not self._ready():
            self._waiter = self._loop.create_future()
            if self._pending is not None:
                self._timer = self._loop.call_later(not_before - time.monotonic(), self._wake)
            try:
                await self._waiter
            except asyncio.CancelledError:
                self._engine.abort(self.request_id)
                raise
            finally:
                self._waiter = None
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
        item, self._pending = self._pending, None
        if item is None:  # only an error is left: what was produced before it came first
            self.finished = True
            raise self._error
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


def put_all(items) -> None:
    """One step's outputs into their streams: runs on the streams' event loop."""
    for stream, out in items:
        stream.put(out)
