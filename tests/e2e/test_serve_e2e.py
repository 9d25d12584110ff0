"""End to end: `serve run serve_config.yaml` in a subprocess, driven with the official openai client.

Starts on a clean Ray (`ray stop` first: this stops any local Ray cluster on the machine), waits
for /health, exercises both bundled models, then stops with SIGINT and checks that no Ray process
is left. Token auth stays at Ray's default (on): it guards Ray's own ports, not the Serve proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import httpx
import openai
import psutil
import pytest

from .hostile_bodies import UNSUPPORTED, hostile_bodies
from .serving import BASE, ray, ray_processes

pytestmark = pytest.mark.slow

MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


@pytest.fixture(scope="module")
def server(default_server):
    return default_server.get()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)


HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_models_list_shows_both_models(client):
    assert {m.id for m in client.models.list().data} == set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_chat_completion_json_and_stream(client, model):
    r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 0
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.prompt_tokens_details.cached_tokens >= 0

    stream = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == r.choices[0].message.content
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_completions_and_max_tokens(client, model):
    extra = {"ignore_eos": True} if model == MODELS[0] else {}  # only SmolLM2's config allows it
    r = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0, extra_body=extra
    )
    assert r.object == "text_completion" and r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6


def test_ignore_eos_needs_the_operators_switch(client):
    with pytest.raises(openai.BadRequestError) as info:  # gemma's config does not allow it
        client.completions.create(model=MODELS[1], prompt="Hi", max_tokens=4, extra_body={"ignore_eos": True})
    assert info.value.body["param"] == "ignore_eos" and "allow_ignore_eos" in info.value.body["message"]


def test_stop_strings(client):
    model, prompt = MODELS[0], "Monday, Tuesday, Wednesday,"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 2, full
    cut = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stop=[words[1]])
    assert cut.choices[0].finish_reason == "stop"
    assert words[1] not in cut.choices[0].text and full.startswith(cut.choices[0].text)


def test_five_concurrent_streams(server):
    async def one(c: openai.AsyncOpenAI, i: int):
        stream = await c.chat.completions.create(
            model=MODELS[i % 2],
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        parts, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def go():
        async with openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="x", max_retries=0, timeout=180) as c:
            return await asyncio.gather(*(one(c, i) for i in range(5)))

    results = asyncio.run(go())
    assert all(text and finish in ("stop", "length") for text, finish in results), results


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=HELLO, max_tokens=4)
    assert "smollm2-135m-instruct" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"extra_body": {"top_k": "many"}}, "top_k"),
    ],
)
def test_bad_parameters_are_bad_requests(client, kwargs, param):
    args = {"model": MODELS[0], "messages": HELLO, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    assert info.value.body["param"] == param


def test_client_disconnect_aborts_the_request(server):
    model = MODELS[0]
    before = httpx.get(f"{BASE}/v1/models/{model}/cache", timeout=30).json()["engine"]
    body = {
        "model": model,
        "prompt": "Count from one to one hundred:",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{BASE}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk: the connection closes
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        engine = httpx.get(f"{BASE}/v1/models/{model}/cache", timeout=30).json()["engine"]
        if engine["aborted"] > before["aborted"] and engine["running"] == 0 and engine["waiting"] == 0:
            break
        time.sleep(0.5)
    assert engine["aborted"] == before["aborted"] + 1, engine
    assert engine["generated_tokens"] - before["generated_tokens"] < 200


def test_sixty_streams_with_six_disconnects_lose_nothing_and_leak_no_block(server):
    """vLLM's abort test over real HTTP: 60 concurrent streams, 6 closed mid-stream by the client."""
    model, max_tokens = MODELS[0], 8

    async def one(c: httpx.AsyncClient, i: int) -> int | None:
        body = {
            "model": model,
            "prompt": f"Count from {i} to one thousand:",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if i % 10 == 0 and line.startswith("data: {"):
                    return None  # leave mid-stream: the connection closes
                if line.startswith("data: {") and '"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
        return usage["completion_tokens"]

    async def go():
        async with httpx.AsyncClient(base_url=BASE, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(60)))

    results = asyncio.run(go())
    assert results.count(None) == 6
    assert all(n == max_tokens for n in results if n is not None), results
    engine, cache = _settled(model)
    assert engine["running"] == 0 and engine["waiting"] == 0, engine
    assert cache["live_sequences"] == 0 and cache["blocks_used"] == 0, cache  # every block is back
    r = httpx.post(f"{BASE}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def _settled(model: str, timeout_s: float = 60) -> tuple[dict, dict]:
    """A model's engine and cache stats once nothing runs or waits."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = httpx.get(f"{BASE}/v1/models/{model}/cache", timeout=30).json()
        engine, cache = stats["engine"], stats["cache"]
        if (
            engine["running"] == 0 and engine["waiting"] == 0 and cache["live_sequences"] == 0
        ) or time.monotonic() > deadline:
            return engine, cache
        time.sleep(0.5)


def test_a_hundred_and_twenty_clients_with_random_disconnects_get_answers_or_clean_refusals(server, client):
    import random

    rng = random.Random(7)
    leave_after = {i: rng.randint(0, 1) for i in rng.sample(range(120), 18)}  # chunks read before leaving

    async def one(c: httpx.AsyncClient, i: int) -> str:
        body = {
            "model": MODELS[i % 2],
            "prompt": f"Tell me about the number {i}.",
            "max_tokens": 6,
            "temperature": 0.7,
            "stream": True,
        }
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                assert r.status_code in (429, 503) and r.headers["retry-after"].isdigit(), r.status_code
                return f"refused {r.status_code}"
            chunks = 0
            async for line in r.aiter_lines():
                assert '"error"' not in line, line
                chunks += line.startswith("data: {")
                if i in leave_after and chunks > leave_after[i]:
                    return "left"
            return "ok"

    async def go():
        limits = httpx.Limits(max_connections=120)
        async with httpx.AsyncClient(base_url=BASE, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(120)))

    outcomes = asyncio.run(go())
    refused_leavers = sum(outcomes[i].startswith("refused") for i in leave_after)
    assert outcomes.count("left") == 18 - refused_leavers and outcomes.count("ok") >= 60, sorted(set(outcomes))
    for model in MODELS:
        engine, cache = _settled(model)
        assert engine["running"] == 0 and engine["waiting"] == 0 and cache["blocks_used"] == 0, (model, engine)
    r = client.chat.completions.create(model=MODELS[0], messages=HELLO, max_tokens=4, temperature=0)
    assert r.choices[0].message.content


def _hostile_bodies() -> dict[str, bytes]:
    return hostile_bodies(MODELS[0])


@pytest.mark.parametrize("name,raw", list(_hostile_bodies().items()), ids=list(_hostile_bodies()))
def test_hostile_bodies_are_4xx_in_the_openai_error_shape(server, name, raw):
    r = httpx.post(f"{BASE}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if name in UNSUPPORTED:
        assert error["code"] == "unsupported_parameter" and error["param"] in name


def test_the_server_is_healthy_after_the_hostile_bodies(client):
    assert httpx.get(f"{BASE}/health", timeout=30).json()["models"] == {m: "ok" for m in MODELS}
    r = client.chat.completions.create(model=MODELS[0], messages=HELLO, max_tokens=4, temperature=0)
    assert r.choices[0].message.content


def test_sigkill_of_a_model_process_mid_stream_ends_its_stream_cleanly_and_it_comes_back(client):
    pids = {m["id"]: m["pid"] for m in httpx.get(f"{BASE}/v1/models", timeout=30).json()["data"]}
    body = {
        "model": MODELS[0],
        "prompt": "Count from one to one thousand:",
        "max_tokens": 300,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    with httpx.stream("POST", f"{BASE}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(pids[MODELS[0]], signal.SIGKILL)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "model_unavailable"  # a clean error event, no hang
    r = client.completions.create(model=MODELS[0], prompt="Hi", max_tokens=3)  # Ray Serve restarted it
    assert r.choices[0].text
    assert client.completions.create(model=MODELS[1], prompt="Hi", max_tokens=3).choices[0].text
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = {m["id"]: m["pid"] for m in httpx.get(f"{BASE}/v1/models", timeout=30).json()["data"]}
        if after[MODELS[0]] not in (None, pids[MODELS[0]]):
            break
        time.sleep(0.5)
    assert after[MODELS[0]] not in (None, pids[MODELS[0]]), after  # a new process
    assert after[MODELS[1]] == pids[MODELS[1]]  # the other model never noticed


def test_metrics_and_health(server):
    text = httpx.get(f"{BASE}/metrics", timeout=30).text
    for model in MODELS:
        assert f'orchard_time_to_first_token_seconds_count{{model="{model}"}}' in text
        assert f'orchard_model_up{{model="{model}"}} 1.0' in text
    assert httpx.get(f"{BASE}/health", timeout=30).json()["models"] == {m: "ok" for m in MODELS}


def test_zz_ctrl_c_stops_everything_and_leaves_no_ray_process(server):
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group (serve run is its leader)."""
    proc: subprocess.Popen = server["proc"]
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) > 3  # gcs_server, raylet, workers...
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 0
    print(f"serve run exited {time.monotonic() - start:.1f}s after Ctrl-C")
    ray("stop", "--force")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(psutil.pid_exists(p) for p in tree) or ray_processes()):
        time.sleep(0.5)
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive and not ray_processes(), (alive, ray_processes())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{BASE}/health", timeout=5)
