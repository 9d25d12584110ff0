"""Fakes shared by the router's tests: scripted model clients and the chunks they play back.

A `FakeClient` stands in for a model's replica behind the router (`ModelClient`): it plays back a
script of hop items (`chunk(...)`, error items) through a real `ModelCall`, so the router's own
deadline, error and cancel handling runs as it does against Ray. No test module imports another;
what several share lives here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx
import numpy as np

from deployments.config import RouterConfig
from deployments.hop import EmbedRequest, GenerateRequest, error_item
from deployments.model_client import ModelCall
from deployments.router import RouterCore, create_app
from engine.errors import InvalidRequestError, OverloadedError

LOOP = asyncio.new_event_loop()


def run(coro):
    return LOOP.run_until_complete(coro)


def chunk(text, n=1, finish=None, usage=None):
    return {"text": text, "n_tokens": n, "finish_reason": finish, "usage": usage, "request_id": "r", "prompt_tokens": 3}


USAGE = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 1}}
# Error items as a replica sends them (their shape is tests/deployments/test_hop.py's to check).
OVERLOADED = error_item(OverloadedError("queue full", retry_after_s=2.0))
HOT = error_item(InvalidRequestError("temperature: too hot", param="temperature"))


def sent(request: GenerateRequest) -> dict:
    """What a request asked for, as plain dicts (the prompt's unset fields left out)."""
    prompt = {k: v for k, v in dataclasses.asdict(request.prompt).items() if v is not None}
    adapter = {"adapter": request.adapter} if request.adapter else {}
    return {"request_id": request.request_id, "prompt": prompt, "sampling": request.sampling, **adapter}


class FakeClient:
    """Plays back a script of items; remembers what it was sent (as `sent` has it) and whether its
    stream was cancelled."""

    kind = "chat"

    def __init__(self, name, items=None, delay=0.0):
        self.name, self.delay = name, delay
        self.items = items if items is not None else [chunk("Hel", 1), chunk("lo", 1), chunk("!", 1, "stop", USAGE)]
        self.payloads, self.cancelled = [], 0

    async def _gen(self):
        for item in self.items:
            if self.delay:
                await asyncio.sleep(self.delay)
            yield item

    async def start(self, request, started_at, deadline, load_timeout_s=None):
        assert isinstance(request, GenerateRequest)
        self.payloads.append(sent(request))

        def cancel():
            self.cancelled += 1

        return await ModelCall(
            self.name, self._gen(), cancel, started_at, deadline, load_timeout_s=load_timeout_s
        ).begin()

    async def stats(self, timeout_s):
        return {
            "running": 1,
            "waiting": 2,
            "kv_cache_bytes": 10,
            "prompt_tokens": 100,
            "cache": {
                "blocks_used": 4,
                "queries": 4,
                "hits": 1,
                "prefix_hits": 1,
                "misses": 2,
                "tokens_reused": 25,
                "mode": "memory",
            },
        }

    async def health(self, timeout_s):
        self.health_calls = getattr(self, "health_calls", 0) + 1
        return None

    async def info(self, timeout_s, load=False):
        return {
            "pid": 4242,
            "loaded_at": 1.0,
            "cold_start_s": 2.5,
            "footprint": {"weights": 100, "kv": 50, "working": 10, "total": 160, "measured": True},
        }


def make_client(router=None, **clients):
    clients = clients or {"m1": FakeClient("m1")}
    core = RouterCore(RouterConfig.model_validate(router or {}), clients)
    transport = httpx.ASGITransport(app=create_app(core))
    return httpx.AsyncClient(transport=transport, base_url="http://test"), core


async def closing_batches(closed: list):
    """Two event batches, then `closed` gets True when the consumer closes them (or they end)."""
    from deployments.events import TextDelta

    try:
        yield [TextDelta("a")]
        yield [TextDelta("b")]
    finally:
        closed.append(True)


def sse_events(body: str) -> list:
    events = [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# --- embedding models: a fake EmbeddingServer handle under the real RayEmbeddingClient ---------


class FakeResponse:
    """What a handle call returns: awaitable (after `delay`, its answer or its exception), cancellable."""

    def __init__(self, answer, delay=0.0):
        self.answer, self.delay, self.cancelled = answer, delay, False

    def __await__(self):
        return self._get().__await__()

    async def _get(self):
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


def fake_vectors(inputs) -> np.ndarray:
    """Input i's vector: [i + 1, 0.5, -0.25, 2**-20] (exact in float32)."""
    return np.array([[i + 1, 0.5, -0.25, 2**-20] for i in range(len(inputs))], dtype=np.float32)


class FakeEmbedHandle:
    """An EmbeddingServer's handle: `embed` answers `fake_vectors` (one prompt token per input
    character or id) after `delay`, or plays back `answers` (an answer, an error item or an
    exception each) first; remembers the requests and the responses it gave."""

    deployment_name = "model-e1"

    def __init__(self, answers=(), delay=0.0):
        self.answers, self.delay = list(answers), delay
        self.requests, self.responses = [], []
        self.embed = _Method(self._embed)
        self.stats = _Method(lambda: FakeResponse({"kind": "embedding", "batching": {"batches": 1}}))
        self.info = _Method(lambda: FakeResponse({"pid": 7, "loaded_at": 1.0, "footprint": {"total": 10}}))
        self.check_health = _Method(lambda: FakeResponse(None))
        self.request_unload = _Method(lambda: FakeResponse({"unload_requested": True}))

    def options(self, **_):
        return self

    def _embed(self, request: EmbedRequest) -> FakeResponse:
        self.requests.append(request)
        if self.answers:
            answer = self.answers.pop(0)
        else:
            answer = {"vectors": fake_vectors(request.inputs), "prompt_tokens": sum(len(x) for x in request.inputs)}
        self.responses.append(FakeResponse(answer, self.delay))
        return self.responses[-1]


def embedding_client(name="e1", handle=None, router=None):
    """The real RayEmbeddingClient over a FakeEmbedHandle."""
    from deployments.model_client import RayEmbeddingClient

    return RayEmbeddingClient(name, handle or FakeEmbedHandle(), RouterConfig.model_validate(router or {}))
