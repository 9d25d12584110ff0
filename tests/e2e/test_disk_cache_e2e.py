"""The disk KV cache end to end: `serve run tests/fixtures/disk_cache.yaml` (SmolLM2, its prefix
cache on disk under a temporary directory), driven with the official openai client.

A ~650-token system prompt (20 blocks) is computed once; then the model is unloaded by its
operator, and the server is stopped with Ctrl-C and started again: each time the next request
reloads the model and takes the prompt's full blocks from disk (`cached_tokens`) with the same
answer. A corrupt block file is skipped (the prompt is computed from there) and the answer stays
the same; a second long prompt makes the directory evict within its cap. The tests run in order
and share the server.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time

import httpx
import openai
import pytest

from engine.kv.disk_tier import MAGIC

from .serving import BASE, ROOT, serve_output, start_serve, stop, wait_for_log, wait_healthy

pytestmark = pytest.mark.slow

MODEL = "smol"
BLOCK = 32
CAP = int(0.045 * 1e9)
SYSTEM = " ".join(f"Rule {i}: answer briefly, politely and only about topic number {i}." for i in range(36))
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hi."}]
FLUSHED = "disk KV cache flushed"
first: dict = {}  # the first answer, computed from scratch


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk-cache")
    config = tmp / "disk_cache.yaml"
    text = (ROOT / "tests" / "fixtures" / "disk_cache.yaml").read_text()
    config.write_text(text.replace("/tmp/mlx-orchard-disk-cache-e2e", str(tmp / "kv")))
    state = {"config": config, "tmp": tmp, "runs": 0}
    start(state)
    try:
        yield state
    finally:
        stop(state["proc"])


def start(state: dict) -> None:
    state["runs"] += 1
    state["log"] = state["tmp"] / f"serve_run_{state['runs']}.log"
    state["proc"] = start_serve(state["config"], state["log"])
    wait_healthy(state["proc"], state["log"])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=240)


def ask(client, messages=MESSAGES) -> tuple[str, int, int]:
    """The answer (greedy), its prompt's tokens and the cached ones."""
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens


def state() -> str:
    body = httpx.get(f"{BASE}/v1/models", timeout=30).json()
    return next(m["state"] for m in body["data"] if m["id"] == MODEL)


def disk() -> dict:
    return httpx.get(f"{BASE}/v1/models/{MODEL}/cache", timeout=30).json()["cache"]["disk"]


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


def full_blocks(prompt_tokens: int) -> int:
    """Tokens a reloaded model takes from disk: the prompt's full blocks (all but its last token at most)."""
    return min(prompt_tokens // BLOCK * BLOCK, prompt_tokens - 1)


def unload_and_wait(server) -> None:
    r = httpx.post(f"{BASE}/v1/models/{MODEL}/unload", timeout=30)
    assert r.status_code == 200 and r.json()["unload_requested"] is True, r.text
    wait_until(lambda: state() == "unloaded", 60, "the model to unload")
    log = wait_for_log(server["proc"], server["log"], FLUSHED, timeout_s=30)
    assert FLUSHED in log, "the replica's shutdown did not reach the disk cache's flush"


def test_1_a_system_prompt_computed_once_is_written_to_disk(server, client):
    text, prompt_tokens, cached = ask(client)
    assert cached == 0 and prompt_tokens > 600
    first.update(text=text, prompt_tokens=prompt_tokens)
    want = prompt_tokens // BLOCK
    got = wait_until(lambda: (d := disk())["writes"] >= want and d, 60, "the prompt's blocks on disk")
    assert got["enabled"] and got["errors"] == got["dropped"] == 0 and got["bytes"] <= CAP


def test_2_after_an_operator_unload_the_reloaded_model_takes_the_prompt_from_disk(server, client):
    unload_and_wait(server)
    text, prompt_tokens, cached = ask(client)
    assert cached >= full_blocks(prompt_tokens) and text == first["text"]
    assert disk()["hits"] >= prompt_tokens // BLOCK


def test_3_after_ctrl_c_and_a_new_serve_run_the_prompt_comes_from_disk(server, client):
    proc = server["proc"]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    proc.wait(120)
    flushes = [line for line in serve_output(server["log"]).splitlines() if FLUSHED in line]
    assert len(flushes) == 2, flushes  # the unload's, then Ctrl-C's (Ray Serve's graceful stop of the replica)
    assert all(line.endswith(" 0 unwritten") for line in flushes), flushes
    stop(proc)
    start(server)
    text, prompt_tokens, cached = ask(client)
    assert cached >= full_blocks(prompt_tokens) and text == first["text"]
    d = disk()
    assert d["hits"] >= prompt_tokens // BLOCK and d["skipped"] == 0


def test_4_a_corrupt_block_file_is_skipped_and_the_answer_stays_right(server, client):
    directory = disk()["path"]
    unload_and_wait(server)
    chain = prompt_chain(directory)
    victim = chain[3]
    data = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(data[:-100] + bytes(100))  # the payload's end zeroed: its checksum fails
    text, prompt_tokens, cached = ask(client)
    assert cached == 3 * BLOCK  # the blocks before the corrupt one; the rest computed again
    assert text == first["text"]
    assert disk()["skipped"] == 1


def test_5_the_directory_stays_within_its_cap(server, client):
    other = " ".join(f"Fact {i}: the colour of box {i} is listed in the inventory under shelf {i}." for i in range(36))
    text, prompt_tokens, _ = ask(client, [{"role": "system", "content": other}, {"role": "user", "content": "Hi."}])
    d = wait_until(lambda: (d := disk())["evicted"] > 0 and d["queued"] == 0 and d, 60, "an eviction")
    on_disk = sum(os.path.getsize(os.path.join(d["path"], f)) for f in os.listdir(d["path"]))
    assert d["bytes"] <= CAP and on_disk <= CAP
    assert d["entries"] >= prompt_tokens // BLOCK  # the newest prompt stays


def prompt_chain(directory: str) -> list[str]:
    """The block files of the system prompt's chain, in order (from each file's header: its hash
    and its parent's): the chain that starts at the one file whose parent is no file."""
    heads = {}
    for name in os.listdir(directory):
        if name.endswith(".kvb"):
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read(64 * 1024)
            (n,) = struct.unpack_from("<I", data, len(MAGIC))
            head = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
            heads[head["hash"]] = (head["parent"], os.path.join(directory, name))
    children = {parent: h for h, (parent, _) in heads.items()}
    roots = [h for h, (parent, _) in heads.items() if parent not in heads]
    assert len(roots) == 1, f"one chain expected, {len(roots)} roots"
    chain, h = [], roots[0]
    while h is not None:
        chain.append(heads[h][1])
        h = children.get(h)
    assert len(chain) >= 14
    return chain
