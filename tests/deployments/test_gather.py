"""Gathered requests (deployments.gather), both ends wired together in one event loop: the
router's Gatherer over a fake handle whose calls run the replica's `serve_gathered` after a hop
delay. Unit tests: no Ray (tests/e2e/test_serve_e2e.py runs the same path through `serve run`)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.gather import Gatherer, serve_gathered
from deployments.hop import GenerateRequest, failure_item
from engine.request import PromptInput

HOP_S = 0.02  # a call's way to the replica


class Replica:
    """The replica's end: each request yields `n` items named after it, one every `step_s`; a
    request whose prompt is "boom" raises after its first item."""

    def __init__(self, n: int = 3, step_s: float = 0.005):
        self.n, self.step_s = n, step_s
        self.calls: list[list[str]] = []  # each call's prompts
        self.running: dict[str, dict[int, asyncio.Task]] = {}
        self.ended: dict[str, str] = {}  # prompt -> "done" / "cancelled"

    async def generate(self, request: GenerateRequest):
        name = request.prompt.text
        try:
            for k in range(self.n):
                await asyncio.sleep(self.step_s)
                yield {"text": f"{name}:{k}"}
                if name == "boom":
                    raise RuntimeError("broken")
            self.ended[name] = "done"
        except asyncio.CancelledError:
            self.ended[name] = "cancelled"
            raise

    async def cancel(self, call_id: str, indices: list[int]) -> None:
        for i in indices:
            task = self.running.get(call_id, {}).get(i)
            if task is not None:
                task.cancel()


class Call:
    """What a streaming handle call returns: the replica's items after the hop; `cancel()`."""

    def __init__(self, replica: Replica, call_id: str, requests: list[GenerateRequest], fail: BaseException | None):
        replica.calls.append([r.prompt.text for r in requests])
        self.cancelled = False
        self._items = self._run(replica, call_id, requests, fail)

    async def _run(self, replica, call_id, requests, fail):
        await asyncio.sleep(HOP_S)
        if fail is not None:
            raise fail
        running = replica.running[call_id] = {}
        async for items in serve_gathered(replica.generate, requests, running, lambda e: failure_item("m", e)):
            yield items

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled:
            await self._items.aclose()
            raise asyncio.CancelledError
        return await self._items.__anext__()

    def cancel(self):
        self.cancelled = True


class Handle:
    def __init__(self, replica: Replica, fail: BaseException | None = None):
        self.replica, self.fail, self.method, self.made = replica, fail, None, []

    def options(self, method_name: str, **_):
        other = Handle(self.replica, self.fail)
        other.method, other.made = method_name, self.made
        return other

    def remote(self, call_id, payload):
        if self.method == "cancel_gathered":
            return self.replica.cancel(call_id, payload)
        call = Call(self.replica, call_id, payload, self.fail)
        self.made.append(call)
        return call


def request(text: str) -> GenerateRequest:
    return GenerateRequest(PromptInput(text=text))


async def read(stream) -> list:
    return [item["text"] async for item in stream]


def test_a_lone_request_goes_at_once_in_a_call_of_its_own():
    async def main():
        replica = Replica()
        gatherer = Gatherer(Handle(replica))
        return replica, await read(gatherer.open(request("a")))

    replica, items = asyncio.run(main())
    assert items == ["a:0", "a:1", "a:2"]
    assert replica.calls == [["a"]] and replica.ended == {"a": "done"}


def test_requests_that_come_while_a_call_is_on_its_way_go_together_each_with_only_its_own_output():
    async def main():
        replica = Replica()
        gatherer = Gatherer(Handle(replica))
        first = gatherer.open(request("a"))
        await asyncio.sleep(HOP_S / 4)  # the first call is on its way
        rest = [gatherer.open(request(x)) for x in "bcde"]
        return replica, await asyncio.gather(read(first), *(read(s) for s in rest))

    replica, outputs = asyncio.run(main())
    assert replica.calls == [["a"], ["b", "c", "d", "e"]]
    assert outputs == [[f"{x}:{k}" for k in range(3)] for x in "abcde"]


def test_cancelling_one_request_of_a_call_ends_it_alone_in_the_replica():
    async def main():
        replica = Replica(n=6)
        gatherer = Gatherer(Handle(replica))
        a, b = gatherer.open(request("a")), gatherer.open(request("b"))
        got = [await a.__anext__()]
        a.cancel()
        return replica, got, await read(b)

    replica, got, b_items = asyncio.run(main())
    assert replica.calls == [["a", "b"]]
    assert got == [{"text": "a:0"}] and len(b_items) == 6
    assert replica.ended == {"a": "cancelled", "b": "done"}


def test_a_request_closed_before_its_call_reached_the_replica_is_cancelled_there_on_arrival():
    async def main():
        replica = Replica(n=6)
        gatherer = Gatherer(Handle(replica))
        a, b = gatherer.open(request("a")), gatherer.open(request("b"))
        await asyncio.sleep(HOP_S / 4)
        a.cancel()  # the call is on its way
        b_items = await read(b)
        await asyncio.sleep(0.01)
        return replica, b_items

    replica, b_items = asyncio.run(main())
    assert replica.calls == [["a", "b"]]
    assert len(b_items) == 6 and replica.ended == {"a": "cancelled", "b": "done"}


def test_a_request_closed_while_it_waits_for_a_call_is_never_sent():
    async def main():
        replica = Replica()
        gatherer = Gatherer(Handle(replica))
        a = gatherer.open(request("a"))
        await asyncio.sleep(HOP_S / 4)
        b, c = gatherer.open(request("b")), gatherer.open(request("c"))
        b.cancel()  # still waiting for a's call to arrive
        return replica, await read(a), await read(c), await read(b)

    replica, a_items, c_items, b_items = asyncio.run(main())
    assert replica.calls == [["a"], ["c"]]
    assert len(a_items) == len(c_items) == 3 and b_items == []


def test_a_call_whose_every_request_closed_is_cancelled():
    async def main():
        replica = Replica()
        handle = Handle(replica)
        gatherer = Gatherer(handle)
        a = gatherer.open(request("a"))
        await asyncio.sleep(0)
        a.cancel()
        await asyncio.sleep(HOP_S * 2)
        return handle.made

    (call,) = asyncio.run(main())
    assert call.cancelled


def test_a_request_that_fails_in_the_replica_gets_a_500_item_and_its_neighbours_finish():
    async def main():
        replica = Replica()
        gatherer = Gatherer(Handle(replica))
        boom, ok = gatherer.open(request("boom")), gatherer.open(request("ok"))
        return [item async for item in boom], await read(ok)

    boom_items, ok_items = asyncio.run(main())
    assert boom_items[0] == {"text": "boom:0"}
    assert boom_items[1]["status_code"] == 500 and boom_items[1]["error"]["type"] == "server_error"
    assert len(boom_items) == 2 and ok_items == ["ok:0", "ok:1", "ok:2"]


def test_a_ray_failure_of_the_call_is_every_request_s_failure():
    from ray.exceptions import ActorDiedError

    async def main():
        gatherer = Gatherer(Handle(Replica(), fail=ActorDiedError()))
        streams = [gatherer.open(request(x)) for x in "ab"]
        out = []
        for s in streams:
            with pytest.raises(ActorDiedError):
                await s.__anext__()
            out.append([item async for item in s])  # and it stays ended
        return out

    assert asyncio.run(main()) == [[], []]


def test_the_router_gathers_only_for_chat_models_with_one_replica_unless_told_not_to():
    from deployments.config import RouterConfig
    from deployments.router import model_client
    from deployments.settings import ModelFacts

    def facts(replicas: int, kind: str = "chat") -> ModelFacts:
        return ModelFacts(
            deployment="d",
            kind=kind,
            load="eager",
            keep_alive_s=None,
            load_timeout_s=60,
            footprint_bytes=1,
            replicas=replicas,
        )

    def gathers(config: RouterConfig, f: ModelFacts) -> bool:
        return getattr(model_client("m", Handle(Replica()), config, f), "_gatherer", None) is not None

    assert gathers(RouterConfig(), facts(1))
    assert not gathers(RouterConfig(), facts(2))  # several replicas: each request routed by itself
    assert not gathers(RouterConfig(gather_requests=False), facts(1))
    assert not gathers(RouterConfig(), facts(1, "embedding"))
