"""Images in requests, router side (deployments.http.images and the three APIs' image parts):
every image is checked before anything is queued, and a bad one is a 400 naming its field.

Fetch tests run a real HTTP server on 127.0.0.1 (no outside network is reached)."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import pytest
from PIL import Image

from deployments.http.errors import ApiError
from deployments.http.images import ImageLimits, ImageLoader, ImageRef
from tests.fakes import FakeClient, make_client


def png(width=8, height=6, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


async def load(urls, **limits):
    refs = [ImageRef(f"messages.0.content.{i}.image_url", u) for i, u in enumerate(urls)]
    return await ImageLoader(ImageLimits(**limits)).load(refs)


async def refused(urls, **limits) -> dict:
    with pytest.raises(ApiError) as info:
        await load(urls, **limits)
    assert info.value.status_code == 400
    return info.value.body["error"]


async def test_a_data_url_image_comes_back_as_its_bytes_in_order():
    a, b = png(color=(1, 2, 3)), png(4, 4, (9, 9, 9))
    assert await load([data_url(a), data_url(b, "image/jpeg")]) == [a, b]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,!!!notbase64", None),
        ("data:image/png,rawtext", None),
        (data_url(b"this is not an image at all"), "invalid_image"),
        ("ftp://example.com/cat.png", None),
    ],
)
async def test_a_bad_image_is_a_400_naming_it(url, code):
    err = await refused([data_url(png()), url])
    assert err["param"] == "messages.0.content.1.image_url"
    assert err["code"] == code


async def test_limits_on_count_bytes_and_pixels_are_400s():
    assert (await refused([data_url(png())] * 3, max_per_request=2))["code"] == "too_many_images"
    big = png(64, 64)
    assert (await refused([data_url(big)], max_bytes=len(big) - 1))["code"] == "image_too_large"
    err = await refused([data_url(png(100, 100))], max_pixels=100 * 99)
    assert err["code"] == "image_too_large" and "100x100" in err["message"]


class _Server:
    """A real HTTP server on 127.0.0.1: /cat.png, /redirect (to localhost), /big, /missing."""

    def __init__(self, image: bytes):
        image_bytes = image

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                if self.path == "/cat.png":
                    self._send(200, image_bytes)
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{self.server.server_port}/cat.png")
                    self.end_headers()
                elif self.path == "/big":
                    self._send(200, b"\0" * 50_000)
                else:
                    self._send(404, b"")

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server(png(5, 5))
    yield s
    s.close()


async def test_an_http_url_is_refused_unless_its_host_is_allowed(server):
    err = await refused([f"{server.base}/cat.png"])
    assert err["code"] == "image_url_not_allowed" and "allow_hosts" in err["message"]
    assert await refused([f"{server.base}/cat.png"], allow_hosts=("*.example.com",))
    assert await load([f"{server.base}/cat.png"], allow_hosts=("127.0.0.1",)) == [png(5, 5)]


async def test_a_fetch_is_capped_in_size_follows_no_redirect_to_a_private_address_and_reports_http_errors(server):
    allowed = ("127.0.0.1", "localhost")
    err = await refused([f"{server.base}/redirect"], allow_hosts=allowed)
    assert "private address" in err["message"]
    err = await refused([f"{server.base}/redirect"], allow_hosts=("127.0.0.1",))
    assert "not allowed" in err["message"]
    assert (await refused([f"{server.base}/big"], allow_hosts=allowed, max_bytes=10_000))["code"] == "image_too_large"
    assert "HTTP 404" in (await refused([f"{server.base}/missing"], allow_hosts=allowed))["message"]


# --- the APIs: image parts reach the model as PromptInput.images, bad ones never do ------------------


def _chat(content, role="user"):
    return {"model": "m1", "messages": [{"role": role, "content": content}]}


async def test_openai_image_parts_reach_the_model_as_bytes_with_image_parts_in_the_messages():
    image = png()
    model = FakeClient("m1")
    client, _ = make_client(m1=model)
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    async with client:
        r = await client.post("/v1/chat/completions", json=_chat(parts))
    assert r.status_code == 200, r.text
    prompt = model.payloads[0]["prompt"]
    assert prompt["images"] == [image]
    assert prompt["messages"][0]["content"] == [{"type": "text", "text": "What is this?"}, {"type": "image"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_chat([{"type": "image_url", "image_url": {"url": data_url(b"nope")}}]), "messages.0.content.0.image_url"),
        (
            _chat([{"type": "image_url", "image_url": {"url": "x", "detail": "low"}}]),
            "messages.0.content.0.image_url.detail",
        ),
        (_chat([{"type": "image_url", "image_url": {"url": data_url(png())}}], role="system"), "messages.0"),
        (_chat([{"type": "input_audio", "input_audio": {}}]), "messages.0.content"),
    ],
)
async def test_openai_bad_image_parts_are_400s_and_nothing_is_sent(body, param):
    model = FakeClient("m1")
    client, _ = make_client(m1=model)
    async with client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert model.payloads == []


async def test_anthropic_base64_image_blocks_reach_the_model_and_images_in_assistant_turns_are_refused():
    image = png()
    model = FakeClient("m1")
    client, _ = make_client(m1=model)
    block = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()},
    }
    body = {
        "model": "m1",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [block, {"type": "text", "text": "?"}]}],
    }
    async with client:
        ok = await client.post("/v1/messages", json=body)
        bad_block = {**block, "source": {**block["source"], "data": base64.b64encode(b"garbage").decode()}}
        bad = await client.post("/v1/messages", json={**body, "messages": [{"role": "user", "content": [bad_block]}]})
        assistant = await client.post(
            "/v1/messages",
            json={
                **body,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [block]},
                    {"role": "user", "content": "?"},
                ],
            },
        )
    assert ok.status_code == 200, ok.text
    assert model.payloads[0]["prompt"]["images"] == [image]
    assert model.payloads[0]["prompt"]["messages"][-1]["content"] == [{"type": "image"}, {"type": "text", "text": "?"}]
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert "messages.0.content.0.source" in bad.json()["error"]["message"]
    assert assistant.status_code == 400 and "belong in user turns" in assistant.json()["error"]["message"]
    assert len(model.payloads) == 1


async def test_responses_input_image_reaches_the_model_and_file_ids_are_refused_by_name():
    image = png()
    model = FakeClient("m1")
    client, _ = make_client(m1=model)
    content = [{"type": "input_text", "text": "Describe"}, {"type": "input_image", "image_url": data_url(image)}]
    body = {"model": "m1", "store": False, "input": [{"role": "user", "content": content}]}
    async with client:
        ok = await client.post("/v1/responses", json=body)
        file_part = {"type": "input_image", "file_id": "file-123"}
        refused_file = await client.post(
            "/v1/responses", json={**body, "input": [{"role": "user", "content": [file_part]}]}
        )
    assert ok.status_code == 200, ok.text
    assert model.payloads[0]["prompt"]["images"] == [image]
    assert model.payloads[0]["prompt"]["messages"][0]["content"] == [
        {"type": "text", "text": "Describe"},
        {"type": "image"},
    ]
    assert refused_file.status_code == 400
    assert refused_file.json()["error"]["param"] == "input.0.content.0.file_id"


def test_prefix_affinity_keys_an_image_by_its_bytes_so_the_same_text_with_another_image_is_another_prefix():
    from deployments.hop import GenerateRequest
    from deployments.prefix_hashing import prompt_text
    from engine.request import PromptInput

    def request(image: bytes) -> GenerateRequest:
        parts = [{"type": "text", "text": "Describe "}, {"type": "image"}, {"type": "text", "text": " briefly"}]
        return GenerateRequest(PromptInput(messages=[{"role": "user", "content": parts}], images=[image]))

    a, b = png(color=(1, 1, 1)), png(color=(2, 2, 2))
    assert prompt_text(request(a)) == prompt_text(request(a))
    assert prompt_text(request(a)) != prompt_text(request(b))
    assert prompt_text(request(a)).startswith("\x02user:Describe ")
