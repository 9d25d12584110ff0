"""A request's output stream: what `AsyncEngine.submit` returns (engine.engine)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .chat_format import OutputFormat
from .request import RequestOutput

if TYPE_CHECKING:
    from .engine import AsyncEngine


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request.

    Outputs the reader has not taken yet are merged into one (vLLM's output collector does the
    same): a reader slower than the engine gets bigger deltas, never a growing queue."""

    def __init__(
        self, engine: AsyncEngine, request_id: str, prompt_ids: list[int], output_format: OutputFormat | None = None
    ):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.format = output_format or OutputFormat()  # how its output is written (engine.chat_format)
        self.prompt_tokens = len(prompt_ids)
        self._engine = engine
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.finished = False
        self.admitted_at: float | None = None  # time.time() when the loop thread took it (hop timing)
        self.admitted_step: int | None = None  # AsyncEngine.steps by then

    def __aiter__(self):
        return self

    def put(self, item: RequestOutput | BaseException) -> None:
        """Runs on the stream's event loop (the engine posts it there)."""
        if isinstance(item, BaseException):
            self._error = item
        elif self._pending is None:
            self._pending = item
        else:
            self._pending = _merge(self._pending, item)
        self._ready.set()

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            await self._ready.wait()
        except asyncio.CancelledError:
            self._engine.abort(self.request_id)
            raise
        item, self._pending = self._pending, None
        if item is None:  # only an error is left: what was produced before it came first
            self.finished = True
            raise self._error
        if self._error is None:
            self._ready.clear()
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
