"""Requests for one model that go to its replica together, in one handle call (both ends).

Every handle call costs Ray Serve the same per-call work in the router and in the replica, so a
burst of N requests reaches a replica spread over N calls' worth of it (benchmarks.lab.serve_floor
measures it; `--gather` measures the same burst sent this way). The router's `Gatherer` sends
the first request of a quiet moment at once, alone; requests that come while a call is on its
way (the replica has not yet acknowledged it) wait, and then all of them go in the next call:
a group commit, which adds no wait to a lone request.

The replica (`serve_gathered`, ModelServer.generate_many) runs each request of a call as
`generate` would, concurrently, and yields what the requests produced since its last item as one
list of `(index, item)`: one Ray item carries every stream's chunk of a window. Its first item,
an empty list, is the acknowledgement.

Each request keeps its own stream (`GatheredStream`), its own errors and its own cancellation:
closing one request's stream cancels that request in the replica (`cancel_gathered`, a call that
reaches the same replica because the router gathers only for a model with one replica); closing
every request of a call cancels the call. A Ray failure of the call (a lost replica, a full
queue) is every one of its requests' failure, as if each had been sent alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from .hop import GenerateRequest

log = logging.getLogger("ray.serve")
_END = object()


class GatheredStream:
    """One request's share of a gathered call: its items in order (an async iterator), and
    `cancel()`, which ends it (the request is aborted in the replica if it already got there)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.call: _Call | None = None  # set when its call is sent
        self.index = -1
        self.closed = False

    def __aiter__(self) -> GatheredStream:
        return self

    async def __anext__(self) -> dict:
        item = await self.queue.get()
        if item is _END:
            self.queue.put_nowait(_END)  # every later read ends too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.queue.put_nowait(_END)
            raise item
        return item

    def cancel(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.call is None:  # still waiting: it will not be sent
            self.queue.put_nowait(_END)
        else:
            self.call.cancel_one(self.index)


class Gatherer:
    """The router's side, for one model: `open(request)` sends it (now, or with the requests that
    come while the call before is on its way) and returns its stream."""

    def __init__(self, handle) -> None:
        self._many = handle.options(stream=True, method_name="generate_many")
        self._cancel = handle.options(method_name="cancel_gathered")
        self._waiting: list[tuple[GenerateRequest, GatheredStream]] = []
        self._sending = False
        self._ids = (f"{os.getpid()}-{id(self):x}-{n}" for n in itertools.count())
        self._tasks: set[asyncio.Task] = set()  # held until done (the loop keeps only weak references)

    def open(self, request: GenerateRequest) -> GatheredStream:
        stream = GatheredStream()
        self._waiting.append((request, stream))
        if not self._sending:
            self._sending = True
            self._spawn(self._send())
        return stream

    def _spawn(self, coro) -> None:
        # A fresh context: a task would copy the opening request's, and Ray Serve cancels the calls
        # made in a request's context when that request is cancelled (its client left): the whole
        # gathered call, every other request's output with it.
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        """Send what waits, one call at a time, each once the one before reached the replica."""
        try:
            while self._waiting:
                batch = [(r, s) for r, s in self._waiting if not s.closed]
                self._waiting = []
                if batch:
                    call = _Call(next(self._ids), [s for _, s in batch], self._cancel_remote)
                    self._spawn(call.run(self._many, [r for r, _ in batch]))
                    await call.acked.wait()
        finally:
            self._sending = False

    def _cancel_remote(self, call_id: str, indices: list[int]) -> None:
        async def cancel() -> None:
            try:
                await self._cancel.remote(call_id, indices)
            except Exception:  # noqa: BLE001 - best effort: a replica gone has nothing to cancel
                log.debug("cancelling gathered requests failed", exc_info=True)

        self._spawn(cancel())


class _Call:
    """One gathered handle call: its requests' streams, fed from its items."""

    def __init__(self, call_id: str, streams: list[GatheredStream], cancel_remote: Callable) -> None:
        self.id, self.streams, self._cancel_remote = call_id, streams, cancel_remote
        self.acked = asyncio.Event()
        self.gen = None
        self.dropped = False  # every request closed before the call was made
        for i, stream in enumerate(streams):
            stream.call, stream.index = self, i

    async def run(self, many, requests: list[GenerateRequest]) -> None:
        try:
            self.gen = many.remote(self.id, requests)
            if self.dropped:
                self.gen.cancel()
            async for items in self.gen:
                if not self.acked.is_set():
                    self._acknowledged()
                for i, item in items:
                    self.streams[i].queue.put_nowait(item)
        except BaseException as exc:  # a Ray failure of the call is each request's failure
            for stream in self.streams:
                stream.queue.put_nowait(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.acked.set()
            for stream in self.streams:
                stream.queue.put_nowait(_END)

    def _acknowledged(self) -> None:
        self.acked.set()
        closed = [i for i, s in enumerate(self.streams) if s.closed]
        if closed and len(closed) < len(self.streams):  # closed while the call was on its way
            self._cancel_remote(self.id, closed)

    def cancel_one(self, index: int) -> None:
        if all(s.closed for s in self.streams):  # nobody waits: the call leaves Ray's queue, or ends
            if self.gen is None:
                self.dropped = True
            else:
                self.gen.cancel()
        elif self.acked.is_set():
            self._cancel_remote(self.id, [index])
        # else: told to the replica once the call reached it (`_acknowledged`)


# --- the replica's side ------------------------------------------------------------------------


async def serve_gathered(
    generate: Callable[[GenerateRequest], AsyncIterator[dict]],
    requests: list[GenerateRequest],
    running: dict[int, asyncio.Task],
    on_error: Callable[[BaseException], dict],
) -> AsyncIterator[list[tuple[int, Any]]]:
    """Run each request through `generate` at once; yield `[]` (the acknowledgement), then lists of
    `(index, item)`: every item produced since the last list. `running` gets each request's task
    (cancelling one ends that request alone); `on_error(exc)` makes an error item of an exception
    a request's `generate` raised, which ends that request alone."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, request: GenerateRequest) -> None:
        try:
            async for item in generate(request):
                queue.put_nowait((i, item))
        except Exception as exc:  # noqa: BLE001 - this request's failure, not its neighbours'
            log.exception("a gathered request failed")
            queue.put_nowait((i, on_error(exc)))
        finally:  # also when cancelled alone (cancel_gathered): the call goes on without it
            queue.put_nowait((i, _END))

    for i, request in enumerate(requests):
        running[i] = asyncio.get_running_loop().create_task(pump(i, request))
    try:
        yield []
        left = len(requests)
        while left:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            items = [(i, item) for i, item in batch if item is not _END]
            left -= len(batch) - len(items)
            if items:
                yield items
    finally:
        tasks = list(running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
