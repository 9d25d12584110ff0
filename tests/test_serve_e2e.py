"""End to end: `serve run serve_config.yaml` in a subprocess, driven with the official openai client.

Starts on a clean Ray (`ray stop` first: this stops any local Ray cluster on the machine), waits
for /health, exercises both bundled models, then stops with SIGINT and checks that no Ray process
is left. Token auth stays at Ray's default (on): it guards Ray's own ports, not the Serve proxy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1:8000"
MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
RAY_PROCESS_NAMES = ("gcs_server", "raylet", "ray::", "dashboard.py", "ServeController", "ServeReplica", "ProxyActor")
BIN = Path(sys.executable).parent


def _ray(*args: str) -> None:
    ray = shutil.which("ray", path=str(BIN)) or "ray"
    subprocess.run([ray, *args], cwd=ROOT, capture_output=True, timeout=120)


def _ray_processes() -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        if any(n in cmd for n in RAY_PROCESS_NAMES) and "pytest" not in cmd:
            found.append(f"{p.info['pid']} {cmd[:100]}")
    return found


def _clean_ray() -> None:
    """`ray stop`, but never under a live server: fail instead of killing someone else's cluster."""
    try:
        httpx.get(f"{BASE}/", timeout=2)
    except httpx.HTTPError:
        _ray("stop", "--force")
        return
    pytest.fail(f"{BASE} is already serving: stop that server (or its Ray cluster) before this test")


def _wait_healthy(proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            pytest.fail(f"serve run exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            r = httpx.get(f"{BASE}/health", timeout=10)
            if r.status_code == 200 and r.json().get("status") == "ok":
                return time.monotonic() - start
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    pytest.fail(f"/health not ok after {timeout_s}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _clean_ray()
    log = tmp_path_factory.mktemp("serve") / "serve_run.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "serve"), "run", "serve_config.yaml"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready_s = _wait_healthy(proc, log)
        print(f"serve run healthy after {ready_s:.1f}s")
        yield {"proc": proc, "log": log, "ready_s": ready_s}
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the `serve run` (a clean shutdown), kill it if it hangs, then stop Ray."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    _ray("stop", "--force")


def test_bad_yaml_fails_with_a_message_naming_the_field(tmp_path):
    """Ray builds the app in its controller: serve run keeps running, but the log names the field."""
    text = (ROOT / "serve_config.yaml").read_text().replace("max_num_seqs: 16", "max_num_seqs: 0", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("stream_window_ms: 30", "stream_windw_ms: 30", 1))
    _clean_ray()
    log = tmp_path / "bad_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "serve"), "run", str(bad)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "Deploying app 'orchard' failed" not in log.read_text():
            time.sleep(1)
        output = log.read_text()
    finally:
        _stop(proc)
    assert "args.models[0].engine.max_num_seqs: Input should be greater than or equal to 1" in output
    assert "args.models[0].stream_windw_ms: Extra inputs are not permitted" in output


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

    stream = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == r.choices[0].message.content
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_completions_and_max_tokens(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6


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
            model=MODELS[i % 2], messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=8, temperature=0, stream=True)
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


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"extra_body": {"top_k": "many"}}, "top_k"),
])
def test_bad_parameters_are_bad_requests(client, kwargs, param):
    args = {"model": MODELS[0], "messages": HELLO, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    assert info.value.body["param"] == param


def test_client_disconnect_aborts_the_request(server):
    model = MODELS[0]
    before = httpx.get(f"{BASE}/v1/models/{model}/cache", timeout=30).json()["engine"]
    body = {"model": model, "prompt": "Count from one to one hundred:", "max_tokens": 200,
            "temperature": 0, "ignore_eos": True, "stream": True}
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


def test_metrics_and_health(server):
    text = httpx.get(f"{BASE}/metrics", timeout=30).text
    for model in MODELS:
        assert f'orchard_time_to_first_token_seconds_count{{model="{model}"}}' in text
        assert f'orchard_model_up{{model="{model}"}} 1.0' in text
    assert httpx.get(f"{BASE}/health", timeout=30).json()["models"] == {m: "ok" for m in MODELS}


def test_zz_shutdown_leaves_no_ray_process(server):
    proc: subprocess.Popen = server["proc"]
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) > 3  # gcs_server, raylet, workers...
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    _ray("stop", "--force")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(psutil.pid_exists(p) for p in tree) or _ray_processes()):
        time.sleep(0.5)
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive and not _ray_processes(), (alive, _ray_processes())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{BASE}/health", timeout=5)
