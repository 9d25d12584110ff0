"""Embeddings end to end: `serve run tests/fixtures/embeddings.yaml` (SmolLM2 for chat and the
bundled all-MiniLM-L6-v2 for embeddings, under one memory governor), driven by the official
`openai` SDK. The vectors agree with sentence-transformers' (tests/fixtures/embedding_reference.json)
in every input form and encoding, mean the right things, and concurrent requests are merged into
fewer engine calls without changing any vector.
"""

from __future__ import annotations

import importlib.util
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from .serving import BASE, ROOT, module_server

pytestmark = pytest.mark.slow

CONFIG = ROOT / "tests" / "fixtures" / "embeddings.yaml"
EMBED, CHAT = "all-minilm-l6-v2", "smollm2-135m-instruct"
REFERENCE = json.loads((ROOT / "tests" / "fixtures" / "embedding_reference.json").read_text())
TEXTS = [item["text"] for item in REFERENCE["inputs"]]
VECTORS = np.array([item["vector"] for item in REFERENCE["inputs"]])


server = module_server(CONFIG)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data])


def token_ids(text: str) -> list[int]:
    """The text as the bundled model's tokenizer encodes it ([CLS] ... [SEP])."""
    from tokenizers import Tokenizer

    zipped = Path(importlib.util.find_spec("all_minilm_l6_v2").origin).parent / "model.zip"
    with zipfile.ZipFile(zipped) as zf:
        tokenizer = Tokenizer.from_str(zf.read("tokenizer.json").decode())
    tokenizer.no_padding()  # the file pads to 128
    return tokenizer.encode(text).ids


def test_a_list_of_texts_agrees_with_sentence_transformers_in_base64_the_sdks_default(client):
    response = client.embeddings.create(model=EMBED, input=TEXTS)
    got = vectors(response)
    assert response.model == EMBED and got.shape == VECTORS.shape
    assert min(cosine(a, b) for a, b in zip(got, VECTORS, strict=True)) >= 0.999
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(i["tokens"] for i in REFERENCE["inputs"])


def test_a_string_in_floats_is_the_same_vector_as_in_base64(client):
    floats = client.embeddings.create(model=EMBED, input=TEXTS[0], encoding_format="float")
    packed = client.embeddings.create(model=EMBED, input=TEXTS[0])
    assert len(floats.data) == 1 and isinstance(floats.data[0].embedding[0], float)
    np.testing.assert_allclose(vectors(floats)[0], vectors(packed)[0], atol=1e-6)
    assert cosine(vectors(floats)[0], VECTORS[0]) >= 0.999 and floats.usage.prompt_tokens == 8


def test_token_ids_give_the_vector_of_the_text_they_encode(client):
    ids = [token_ids(t) for t in TEXTS[:2]]
    one = client.embeddings.create(model=EMBED, input=ids[0])
    many = client.embeddings.create(model=EMBED, input=ids)
    assert cosine(vectors(one)[0], VECTORS[0]) >= 0.999
    assert min(cosine(a, b) for a, b in zip(vectors(many), VECTORS[:2], strict=True)) >= 0.999
    assert many.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_dimensions_keep_the_first_components_renormalized(client):
    got = vectors(client.embeddings.create(model=EMBED, input=TEXTS[:2], dimensions=64))
    assert got.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosine(got[0], VECTORS[0][:64]) >= 0.999


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(client):
    food, bread, violin = vectors(
        client.embeddings.create(model=EMBED, input=[TEXTS[0], TEXTS[1], TEXTS[4]], encoding_format="float")
    )
    assert cosine(food, bread) > cosine(food, violin) + 0.2


def test_an_over_long_input_is_a_400_unless_truncation_is_asked(client):
    long = REFERENCE["truncated"]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBED, input=["short", long["text"]])
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    assert err.value.param == "input" and "input[1]" in err.value.message
    cut = client.embeddings.create(model=EMBED, input=long["text"], extra_body={"truncate": True})
    assert cosine(vectors(cut)[0], long["vector"]) >= 0.999 and cut.usage.prompt_tokens == long["tokens"]


def test_each_kind_of_model_refuses_the_other_kinds_endpoints_naming_model(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.param == "model" and "embedding model" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=CHAT, input="hi")
    assert err.value.param == "model" and "is a chat model" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    for extra, param in (({"pooling": "cls"}, "pooling"), ({"dimensions": 385}, "dimensions")):
        bad = httpx.post(f"{BASE}/v1/embeddings", json={"model": EMBED, "input": "hi", **extra}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    bad = httpx.post(f"{BASE}/v1/embeddings", json={"model": EMBED, "input": [101, 30522, 102]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input", bad.text


def test_models_lists_both_kinds(client):
    kinds = {m.id: m.kind for m in client.models.list().data}
    assert kinds == {CHAT: "chat", EMBED: "embedding"}
    chat = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content


def batches() -> int:
    stats = httpx.get(f"{BASE}/v1/models/{EMBED}/cache", timeout=30).json()["engine"]
    return stats["batching"]["batches"]


def test_concurrent_requests_are_merged_and_each_gets_its_own_vectors(client):
    solo = vectors(client.embeddings.create(model=EMBED, input=TEXTS))
    jobs = [TEXTS[i % len(TEXTS)] for i in range(16)]
    before = batches()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda text: client.embeddings.create(model=EMBED, input=text), jobs))
    computed = batches() - before
    for i, answer in enumerate(answers):
        assert cosine(vectors(answer)[0], solo[i % len(TEXTS)]) >= 0.99999
    assert 1 <= computed < len(jobs)  # @serve.batch merged some of them


def card_in_state(state: str, timeout_s: float = 60) -> dict:
    """The embedding model's card once the router's directory (polled twice a second) says `state`."""
    deadline = time.monotonic() + timeout_s
    while (card := httpx.get(f"{BASE}/v1/models/{EMBED}", timeout=30).json())["state"] != state:
        if time.monotonic() > deadline:
            pytest.fail(f"the embedding model is still {card['state']}, not {state}")
        time.sleep(0.5)
    return card


def test_an_unloaded_embedding_model_is_loaded_by_its_next_request(client):
    unload = httpx.post(f"{BASE}/v1/models/{EMBED}/unload", timeout=30)
    assert unload.status_code == 200 and unload.json()["unload_requested"]
    card_in_state("unloaded")
    response = client.embeddings.create(model=EMBED, input=TEXTS[0])
    assert cosine(vectors(response)[0], VECTORS[0]) >= 0.999
    card = card_in_state("loaded", timeout_s=10)
    assert card["loads"] == 2 and card["footprint"]["measured"]
