"""The memory governor end to end: `serve run tests/fixtures/governor.yaml`, five models in a
budget that holds two, driven over real HTTP with the official openai client.

The tests run in order on one server and each leaves the state the next one starts from (which
models are loaded); each asserts the state it starts from, so a failure says where it began.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import psutil
import pytest

from .serving import BASE, ROOT, metric, start_serve, stop, wait_healthy

pytestmark = pytest.mark.slow

CONFIG = ROOT / "tests" / "fixtures" / "governor.yaml"
BUDGET_MB = 2350
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("governor") / "serve_run.log"
    proc = start_serve(CONFIG, log)
    try:
        wait_healthy(proc, log)
        yield {"proc": proc, "log": log}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=240)


def models() -> dict[str, dict]:
    body = httpx.get(f"{BASE}/v1/models", timeout=30).json()
    assert body["memory"]["budget_bytes"] == BUDGET_MB * 2**20
    assert body["memory"]["used_bytes"] <= body["memory"]["budget_bytes"]
    return {m["id"]: m for m in body["data"]}


def states() -> dict[str, str]:
    return {name: m["state"] for name, m in models().items()}


def loaded() -> set[str]:
    return {n for n, s in states().items() if s == "loaded"}


def wait_until(check, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}; states: {states()}")


def ask(client, model: str, max_tokens: int = 10) -> str:
    if model == "gemma":  # a base model: completions
        r = client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=max_tokens, temperature=0
        )
        return r.choices[0].text
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def loads(model: str) -> float:
    text = httpx.get(f"{BASE}/metrics", timeout=30).text
    return metric(text, "orchard_model_loads_total", model=model) or 0.0


class Stream(threading.Thread):
    """A long streamed completion in the background; `.result` is (text chunks, finish, tokens),
    finish "closed" when `close()` ended it early (the client disconnects; the server aborts it)."""

    def __init__(self, model: str, max_tokens: int):
        super().__init__(daemon=True)
        self.model, self.max_tokens, self.result, self.error = model, max_tokens, None, None
        self.started, self.closing, self.chunks = threading.Event(), threading.Event(), 0

    def close_after_more_chunks(self, more: int = 5, timeout_s: float = 60) -> None:
        """Once it has streamed `more` chunks beyond now (it is still being served), disconnect."""
        target, deadline = self.chunks + more, time.monotonic() + timeout_s
        while self.chunks < target and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.chunks >= target and self.error is None, (self.model, self.chunks, target, self.error)
        self.closing.set()
        self.join(60)

    def run(self):
        c = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            stream = c.completions.create(
                model=self.model,
                prompt="Count from one to one thousand:",
                max_tokens=self.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            finish, usage = None, None
            for chunk in stream:
                self.started.set()
                self.chunks += 1
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
                if self.closing.is_set():
                    stream.close()
                    finish = "closed"
                    break
            self.result = (self.chunks, finish, usage.completion_tokens if usage else None)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.started.set()


def test_1_a_third_model_evicts_the_least_recently_used_one(client):
    assert loaded() == set()
    first = ask(client, "tiny-a")
    assert "Paris" in first
    assert ask(client, "tiny-b") == first  # the same weights under another name: the same greedy answer
    pid_a = models()["tiny-a"]["pid"]
    assert loaded() == {"tiny-a", "tiny-b"}
    assert ask(client, "gemma").strip()
    assert loaded() == {"tiny-b", "gemma"}  # tiny-a was the least recently used
    card = models()["tiny-a"]
    assert card["state"] == "unloaded" and card["unloads"] == 1 and card["footprint"]["measured"]
    assert process_gone(pid_a), "the evicted model's process still exists"
    assert ask(client, "tiny-b") == first


def test_2_five_concurrent_requests_for_a_cold_model_cause_one_load():
    assert "tiny-a" not in loaded()
    before = loads("tiny-a")

    async def go():
        async with openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=240) as c:
            return await asyncio.gather(
                *(
                    c.chat.completions.create(model="tiny-a", messages=QUESTION, max_tokens=10, temperature=0)
                    for _ in range(5)
                )
            )

    answers = {r.choices[0].message.content for r in asyncio.run(go())}
    assert len(answers) == 1 and "Paris" in answers.pop()
    wait_until(lambda: loads("tiny-a") > before, 10, "the load to be counted")
    time.sleep(1.5)  # a second load would have shown by now
    assert loads("tiny-a") == before + 1
    assert loaded() == {"tiny-a", "tiny-b"}  # gemma was the least recently used


def test_3_a_streaming_model_stays_loaded_while_others_come_and_go(client):
    assert loaded() == {"tiny-a", "tiny-b"}
    pid_a, loads_a = models()["tiny-a"]["pid"], loads("tiny-a")
    stream = Stream("tiny-a", max_tokens=1000)  # outlasts two loads; closed once they are done
    stream.start()
    assert stream.started.wait(120) and stream.error is None
    assert ask(client, "gemma").strip()  # evicts tiny-b, the idle one, not tiny-a
    assert loaded() == {"tiny-a", "gemma"}
    assert "Paris" in ask(client, "tiny-b")  # evicts gemma: tiny-a is still streaming
    assert stream.is_alive(), "the stream ended before the others were loaded: the test proved nothing"
    assert loaded() == {"tiny-a", "tiny-b"}
    stream.close_after_more_chunks()  # still served after both loads, then the client leaves
    assert stream.error is None and stream.result[1] == "closed", stream.result
    assert models()["tiny-a"]["pid"] == pid_a and loads("tiny-a") == loads_a


def test_4_no_room_in_time_is_a_503_with_retry_after_and_nothing_else_is_disturbed(client):
    assert loaded() == {"tiny-a", "tiny-b"}
    busy = [Stream("tiny-a", 1000), Stream("tiny-b", 1000)]  # closed once the 503 is in
    for s in busy:
        s.start()
    assert all(s.started.wait(120) for s in busy)
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "tiny-d")  # load_timeout_s: 4, and both loaded models are busy
    waited = time.monotonic() - start
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"].isdigit()
    assert info.value.body["code"] == "model_loading" and "load_timeout_s" in info.value.body["message"]
    assert 3.5 <= waited < 30
    for s in busy:
        s.close_after_more_chunks()  # undisturbed by the wait and the refusal
        assert s.error is None and s.result[1] == "closed", (s.model, s.result, s.error)
    assert models()["tiny-d"]["loads"] == 0  # the request that left the queue cost nobody their slot
    assert loaded() == {"tiny-a", "tiny-b"}
    assert "Paris" in ask(client, "tiny-a")


def test_5_keep_alive_unloads_the_model_and_its_memory_is_returned(client):
    assert "Paris" in ask(client, "tiny-e")  # keep_alive: 4s
    card = wait_until(
        lambda: models()["tiny-e"] if models()["tiny-e"]["state"] == "loaded" else None, 10, "tiny-e to show as loaded"
    )
    pid = card["pid"]
    rss = psutil.Process(pid).memory_info().rss
    assert rss > card["footprint"]["weights"] * 0.9  # its float32 weights live in that process

    def scraped_and_unloaded() -> bool:
        """A scrape and a health poll every half second, as a monitor would: status reads are no
        use of a model, so they must not keep it loaded (they reach the replicas without a request)."""
        health = httpx.get(f"{BASE}/health", timeout=30)
        assert health.status_code == 200, health.text
        httpx.get(f"{BASE}/metrics", timeout=30).raise_for_status()
        return states()["tiny-e"] == "unloaded"

    scrape = httpx.get(f"{BASE}/metrics", timeout=30).text
    assert metric(scrape, "orchard_model_up", model="tiny-e") == 1.0  # its replica answered the status read

    wait_until(scraped_and_unloaded, 30, "tiny-e to unload after its keep_alive")
    wait_until(lambda: process_gone(pid), 15, "tiny-e's process to exit")
    assert models()["tiny-e"]["unloads"] == 1


def test_6_operators_load_and_unload(client):
    r = httpx.post(f"{BASE}/v1/models/tiny-b/load", timeout=240)
    assert r.status_code == 200 and r.json()["state"] == "loaded", r.text
    pid = r.json()["pid"]
    assert psutil.pid_exists(pid)
    r = httpx.post(f"{BASE}/v1/models/tiny-b/unload", timeout=30)
    assert r.status_code == 200 and r.json()["unload_requested"] is True, r.text
    wait_until(lambda: states()["tiny-b"] == "unloaded", 30, "tiny-b to unload")
    wait_until(lambda: process_gone(pid), 15, "tiny-b's process to exit")
    r = httpx.post(f"{BASE}/v1/models/no-such-model/load", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_6b_a_request_that_arrives_while_its_model_unloads_is_answered(client):
    before = models()["tiny-b"]["loads"]
    r = httpx.post(f"{BASE}/v1/models/tiny-b/load", timeout=240)
    assert r.status_code == 200 and r.json()["state"] == "loaded", r.text
    assert httpx.post(f"{BASE}/v1/models/tiny-b/unload", timeout=30).status_code == 200
    assert "Paris" in ask(client, "tiny-b")  # right behind the unload: answered, by this replica or a new one
    wait_until(lambda: states()["tiny-b"] == "unloaded", 30, "tiny-b to unload once idle")
    assert "Paris" in ask(client, "tiny-b")  # and loaded again on demand
    card = wait_until(
        lambda: models()["tiny-b"] if models()["tiny-b"]["state"] == "loaded" else None, 10, "tiny-b to show as loaded"
    )
    assert card["loads"] >= before + 2  # the operator's load, then the load on demand


def test_7_metrics_show_the_budget_and_the_models():
    text = httpx.get(f"{BASE}/metrics", timeout=30).text
    assert metric(text, "orchard_memory_budget_bytes") == BUDGET_MB * 2**20
    assert 0 < metric(text, "orchard_memory_used_bytes") <= BUDGET_MB * 2**20
    for name, card in models().items():
        assert metric(text, "orchard_model_loads_total", model=name) == card["loads"]
        assert metric(text, "orchard_model_state", model=name, state=card["state"]) == 1.0
    assert metric(text, "orchard_model_cold_start_seconds_count", model="tiny-a") == 2


def test_8_a_load_that_fails_is_a_503_with_the_reason_and_nothing_else_is_disturbed(client):
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "broken")  # a truncated GGUF file
    assert info.value.status_code == 503 and info.value.body["message"]
    assert time.monotonic() - start < 60
    card = wait_until(
        lambda: models()["broken"] if models()["broken"].get("load_error") else None,
        60,
        "Ray to report the failed load",
    )
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "broken")  # now answered at once, with the reason
    assert info.value.body["code"] == "model_load_failed" and "broken" in info.value.body["message"]
    assert card["state"] != "loaded" and "Paris" in ask(client, "tiny-a")
