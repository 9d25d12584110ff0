"""A hybrid model end to end: `serve run tests/fixtures/agents.yaml`'s qwen3-5-tiny (Qwen3.5's
layout, gated delta-net layers beside attention, tiny with random weights: engine.loading.families)
through the official `openai` client. It runs in our paged cache: a repeated prompt answers exactly
what it answered cold from cached tokens, a prompt that continues an answered one resumes, and
`/v1/models/{name}/cache` says which path the model runs, why, and how many state snapshots it
keeps."""

from __future__ import annotations

import httpx
import openai
import pytest

from .serving import BASE

pytestmark = pytest.mark.slow

MODEL = "qwen3-5-tiny"
PROMPT = "t12 t40 t7 t300 t5 t77 t8 t150 t9 t61 t2 t33 t18 t250 t4 t99 t123 t64 t3 t201 t45"


@pytest.fixture(scope="module")
def client(agents_server):
    agents_server.get()
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client, prompt: str):
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    return r.choices[0].text, r.usage


def cache_report() -> dict:
    return httpx.get(f"{BASE}/v1/models/{MODEL}/cache", timeout=30).json()


def test_a_hybrid_model_runs_in_the_paged_cache_and_says_so(client):
    complete(client, "t1 t2 t3")
    report = cache_report()
    assert report["cache"]["path"] == "paged", report["cache"]
    assert "recurrent" in report["cache"]["why"]
    assert report["engine"]["batched"] is True and report["engine"]["batch_check"] in ("passed", "skipped")


def test_a_repeat_and_a_continuation_reuse_the_cache_and_answer_as_cold(client):
    cold_text, cold = complete(client, PROMPT)
    again_text, again = complete(client, PROMPT)
    assert cold.prompt_tokens_details is None or not cold.prompt_tokens_details.cached_tokens
    assert again_text == cold_text and again.prompt_tokens_details.cached_tokens > 0
    # The synthetic vocabulary has no merges, so the answer's text encodes to other ids than the
    # answer's: the continuation resumes from the prompt's state (the matrix in
    # tests/engine/test_families.py resumes past the answer, with token ids).
    _, cont = complete(client, PROMPT + cold_text + " t5 t6")
    assert cont.prompt_tokens_details.cached_tokens >= cold.prompt_tokens - 1
    assert cache_report()["cache"]["state_resumes"] >= 2
