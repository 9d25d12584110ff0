"""End to end, LoRA adapters served by name: the shared `serve run tests/fixtures/agents.yaml`,
whose smollm2-135m-instruct (the bundled SmolLM2-135M) has three adapters made by
tests/e2e/conftest.py (random non-zero LoRA weights in mlx_lm's format), one malformed adapter,
and two slots for the three, driven with the official `openai` and `anthropic` SDKs. A burst of
the three adapters and the base, greedy, answers each as it answers alone; the adapters are listed
in /v1/models with their base, path and state; an unknown name is a 404; the malformed adapter is
a 4xx naming it while the others keep answering; the load and unload routes take adapter names.
That each row of a mixed batch equals mlx_lm's own adapter is tests/engine's to check."""

from __future__ import annotations

import asyncio

import anthropic
import httpx
import openai
import pytest

from tests.lora_adapters import SERVED

from .serving import BASE

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
NAMES = [MODEL, *SERVED]
ASK = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def server(agents_server):
    return agents_server.get() | {"adapters": agents_server.adapters}


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)


def answer(model: str) -> str:
    out = client().chat.completions.create(model=model, messages=ASK, max_tokens=8, temperature=0)
    assert out.model == model
    return out.choices[0].message.content


@pytest.fixture(scope="module")
def alone(server) -> dict[str, str]:
    """Each name's greedy answer, one request at a time."""
    return {name: answer(name) for name in NAMES}


def models() -> dict[str, dict]:
    return {m.id: m.model_dump() for m in client().models.list().data}


def test_a_burst_of_three_adapters_and_the_base_answers_each_as_alone(alone):
    async def burst():
        aclient = openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)
        asks = [aclient.chat.completions.create(model=n, messages=ASK, max_tokens=8, temperature=0) for n in NAMES]
        return [out.choices[0].message.content for out in await asyncio.gather(*asks)]

    assert dict(zip(NAMES, asyncio.run(burst()))) == alone
    assert all(alone[name] != alone[MODEL] for name in SERVED), alone  # each adapter changes the answer
    loaded = [n for n, m in models().items() if m.get("parent") == MODEL and m["state"] == "loaded"]
    assert len(loaded) <= 2, loaded  # two slots: the least recently used idle adapter made room


def test_every_api_answers_for_an_adapter_name(alone):
    responses = client().responses.create(model="sql", input=ASK[0]["content"], max_output_tokens=8, temperature=0)
    assert responses.model == "sql" and responses.output_text == alone["sql"]
    messages = anthropic.Anthropic(base_url=BASE, api_key="not-needed", max_retries=0, timeout=120)
    msg = messages.messages.create(model="sql", max_tokens=8, messages=ASK, extra_body={"temperature": 0})
    assert msg.model == "sql" and msg.content[0].text == alone["sql"]
    counted = [messages.messages.count_tokens(model=n, messages=ASK).input_tokens for n in ("sql", MODEL)]
    assert counted[0] == counted[1] > 0


def test_v1_models_lists_each_adapter_with_its_base_path_and_state(server, alone):
    cards = models()
    assert set(NAMES) | {"broken"} <= set(cards)
    for name in [*SERVED, "broken"]:
        card = cards[name]
        assert card["parent"] == MODEL and card["root"] == str(server["adapters"] / name)
        assert card["state"] in ("loaded", "unloaded", "failed")
    assert cards[MODEL]["state"] == "loaded" and "parent" not in cards[MODEL]


def test_an_unknown_name_is_a_404():
    with pytest.raises(openai.NotFoundError) as info:
        answer("no-such-adapter")
    assert "no-such-adapter" in str(info.value)


def test_the_malformed_adapter_is_refused_naming_it_and_the_others_keep_answering(alone):
    with pytest.raises(openai.APIStatusError) as info:
        answer("broken")
    assert 400 <= info.value.status_code < 500 and "broken" in str(info.value), info.value
    card = models()["broken"]
    assert card["state"] == "failed" and card["load_error"], card
    assert {name: answer(name) for name in NAMES} == alone


def test_load_and_unload_take_adapter_names(alone):
    with httpx.Client(base_url=BASE, timeout=60) as http:
        loaded = http.post("/v1/models/poet/load")
        assert loaded.status_code == 200 and loaded.json()["state"] == "loaded", loaded.text
        unloaded = http.post("/v1/models/poet/unload")
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded", unloaded.text
        assert models()["poet"]["state"] == "unloaded" and models()[MODEL]["state"] == "loaded"
        broken = http.post("/v1/models/broken/load")
        assert 400 <= broken.status_code < 500 and "broken" in broken.json()["error"]["message"]
    assert answer("poet") == alone["poet"]  # loaded again on demand
