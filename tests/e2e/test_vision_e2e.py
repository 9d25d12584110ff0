"""Images end to end: `serve run tests/fixtures/multimodal.yaml` — a chat model, a vision model
(`synthetic:gemma3-vlm`: gemma-3-4b-it's config scaled down, random weights; mlx-vlm's vision tower,
mlx_lm's language model in our batch) and an embedding model in a budget that holds two — driven
by the official openai and anthropic SDKs.

The tests run in order on one server; the last one makes the governor evict and reload models.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import anthropic
import httpx
import numpy as np
import openai
import pytest

from .serving import BASE, ROOT, module_server

pytestmark = pytest.mark.slow

CONFIG = ROOT / "tests" / "fixtures" / "multimodal.yaml"
VLM, CHAT, EMBED = "gemma3-vlm", "smollm2-135m-instruct", "all-minilm-l6-v2"
BLOCK = 8  # the VLM's engine.block_size
QUESTION = "Describe the image."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANSWERS: dict[str, str] = {}  # first answers, compared after the governor reloads each model


def png(seed: int, size=(40, 50)) -> bytes:
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


CAT, DOG = png(1), png(2)


server = module_server(CONFIG)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=240)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=BASE, api_key="unused", max_retries=0, timeout=240)


def ask(client, *urls: str, model: str = VLM, text: str = QUESTION, **kwargs):
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=8, **kwargs
    )


def cached(completion) -> int:
    return completion.usage.prompt_tokens_details.cached_tokens


def loaded() -> set[str]:
    body = httpx.get(f"{BASE}/v1/models", timeout=30).json()
    assert body["memory"]["used_bytes"] <= body["memory"]["budget_bytes"]
    return {m["id"] for m in body["data"] if m["state"] == "loaded"}


def test_1_an_image_is_answered_and_the_same_image_again_is_a_prefix_hit_with_the_same_answer(client):
    first = ask(client, data_url(CAT))
    again = ask(client, data_url(CAT))
    other = ask(client, data_url(DOG))
    ANSWERS[VLM] = first.choices[0].message.content
    assert again.choices[0].message.content == ANSWERS[VLM]
    prompt = first.usage.prompt_tokens
    assert prompt == again.usage.prompt_tokens == other.usage.prompt_tokens
    assert cached(again) >= prompt - 2 * BLOCK  # every full block but the one the last token needs
    # another image: only the blocks before the image are shared
    assert cached(other) < cached(again) - BLOCK


def test_2_the_anthropic_sdk_sends_a_base64_image_and_gets_the_same_greedy_answer(claude):
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(CAT).decode()},
    }
    message = claude.messages.create(
        model=VLM, max_tokens=8, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}, image]}]
    )
    assert message.content[0].text == ANSWERS[VLM]
    assert message.usage.cache_read_input_tokens > 0


@pytest.mark.parametrize(
    ("urls", "param", "code"),
    [
        ((data_url(CAT), data_url(b"not an image")), "messages.0.content.2.image_url", "invalid_image"),
        ((data_url(CAT),) * 4, "messages.0.content.4.image_url", "too_many_images"),
        (("http://10.1.2.3/cat.png",), "messages.0.content.1.image_url", "image_url_not_allowed"),
    ],
)
def test_3_bad_images_are_400s_naming_them_and_the_model_keeps_serving(client, urls, param, code):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, *urls)
    error = info.value.body
    assert (error["param"], error["code"]) == (param, code)
    assert ask(client, data_url(CAT)).choices[0].message.content == ANSWERS[VLM]


class _ImageServer:
    def __init__(self, image: bytes):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/cat.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_4_an_image_url_of_an_allowed_host_is_fetched_and_is_the_same_image(client):
    served = _ImageServer(CAT)
    try:
        fetched = ask(client, served.url)
    finally:
        served.close()
    assert fetched.choices[0].message.content == ANSWERS[VLM]
    assert cached(fetched) > 0  # the same bytes: the same blocks


def test_5_tools_and_an_image_in_one_request_are_both_in_the_prompt(client):
    plain = ask(client, data_url(CAT))
    with_tools = ask(client, data_url(CAT), tools=[WEATHER])
    assert with_tools.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # the tool's definition is rendered


def test_6_a_text_only_model_refuses_an_image_naming_the_field(client):
    ANSWERS[CHAT] = ask(client, model=CHAT, text="What is the capital of France?").choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, data_url(CAT), model=CHAT)
    assert info.value.body["param"].startswith("messages")
    assert "image" in info.value.body["message"]


def test_7_chat_vision_and_embeddings_take_turns_in_a_budget_of_two_and_every_answer_is_right(client):
    reference = json.loads((ROOT / "tests" / "fixtures" / "embedding_reference.json").read_text())["inputs"][0]
    for _ in range(2):
        vector = np.array(
            client.embeddings.create(model=EMBED, input=reference["text"], encoding_format="float").data[0].embedding
        )
        assert float(vector @ np.array(reference["vector"]) / np.linalg.norm(vector)) >= 0.999
        assert len(loaded()) <= 2
        assert (
            ask(client, model=CHAT, text="What is the capital of France?").choices[0].message.content == ANSWERS[CHAT]
        )
        assert len(loaded()) <= 2
        assert ask(client, data_url(CAT)).choices[0].message.content == ANSWERS[VLM]
        assert len(loaded()) <= 2
    models = {m["id"]: m for m in httpx.get(f"{BASE}/v1/models", timeout=30).json()["data"]}
    loads = {name: models[name]["loads"] for name in (EMBED, CHAT, VLM)}
    assert all(n >= 2 for n in loads.values()), loads  # each was evicted and reloaded (least recently used)
