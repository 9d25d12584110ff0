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

from deployments.config import RouterConfig
from deployments.hop import GenerateRequest, error_item
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
    return {"request_id": request.request_id, "prompt": prompt, "sampling": request.sampling}


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
