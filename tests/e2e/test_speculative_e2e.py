"""End to end, speculative decoding: a real `serve run tests/fixtures/agents.yaml`, where
smollm2-135m-instruct (the bundled SmolLM2, real weights) has `engine.speculative: {method:
ngram}`, driven with the official `openai` SDK. An editing request (the answer repeats the
prompt) is verified in the batch, streamed and not, with the same greedy text; the model's cache
stats (`GET /v1/models/{name}/cache`) and `/metrics` say how drafting fares. qwen3-5-tiny (a
hybrid model) asks for speculation too and is served without it. Token-for-token equality with
decoding without speculation is tests/engine/test_speculative.py's."""

from __future__ import annotations

import httpx
import openai
import pytest

from .serving import BASE, metric

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PASSAGE = (
    "The quick brown fox jumps over the lazy dog. Alice met Bob at the market on Tuesday, and they "
    "bought three apples, two pears and a melon for the picnic by the river."
)


@pytest.fixture(scope="module")
def server(agents_server):
    return agents_server.get()


def test_an_editing_request_is_verified_in_the_batch_and_measured(server):
    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)
    ask = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Repeat this text exactly, word for word:\n" + PASSAGE}],
        max_tokens=40,
        temperature=0,
    )
    whole = client.chat.completions.create(**ask).choices[0].message.content
    assert PASSAGE[:30] in whole
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **ask))
    assert streamed == whole

    engine = httpx.get(f"{BASE}/v1/models/{MODEL}/cache", timeout=30).json()["engine"]
    spec = engine["speculative"]
    assert spec["method"] == "ngram"
    assert spec["verify_steps"] > 0 and 0 < spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert spec["tokens_per_step"] > 1
    text = httpx.get(f"{BASE}/metrics", timeout=30).text
    assert float(metric(text, "orchard_speculative_tokens_per_step", model=MODEL)) > 1
    assert 0 < float(metric(text, "orchard_speculative_acceptance_rate", model=MODEL)) <= 1


def test_a_hybrid_model_asking_for_speculation_is_served_without_it(server):
    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)
    out = client.completions.create(
        model="qwen3-5-tiny", prompt="a b c a b c a b", max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 6
    engine = httpx.get(f"{BASE}/v1/models/qwen3-5-tiny/cache", timeout=30).json()["engine"]
    assert "speculative" not in engine
