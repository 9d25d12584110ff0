"""The benchmarks' HTTP client: targets, one streamed request with client-side timing, the cache
stats endpoint, and the model list with its states for suites that drive our own `serve run`.

Plain httpx (async) and a hand-written SSE reader, so every status code and every byte's arrival
time is visible and nothing is retried behind our back: a failed request is a counted error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from .metrics import RequestResult

BASE = "http://127.0.0.1:8000"  # our `serve run` (deployments.launch starts it there)


@dataclass
class Model:
    name: str  # what the tables show
    request_name: str  # what is sent as `model`


@dataclass
class Target:
    label: str
    base_url: str  # without /v1
    models: list[Model]
    api_key: str | None = None
    ignore_eos: dict[str, bool] = field(default_factory=dict)  # per request_name, from the probe
    stats_seen: dict[str, bool] = field(default_factory=dict)  # per request_name: has a cache stats endpoint


def normalize_base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def parse_model(spec: str) -> Model:
    """`NAME` or `DISPLAY=NAME` (show DISPLAY, send NAME: line rows up across servers)."""
    display, sep, name = spec.partition("=")
    return Model(display, name) if sep and display and name else Model(spec, spec)


def parse_target(parts: list[str], default_models: list[str], api_key: str | None) -> Target:
    """`LABEL=URL [MODEL ...]`; without models, the --model list."""
    label, sep, url = parts[0].partition("=")
    if not sep or not label or not url.startswith(("http://", "https://")):
        raise ValueError(f"--target wants LABEL=URL [MODEL ...], got {' '.join(parts)!r}")
    models = [parse_model(m) for m in (parts[1:] or default_models)]
    if not models:
        raise ValueError(f"target {label!r} has no model: give --model or models after the URL")
    return Target(label, normalize_base(url), models, api_key)


def make_client(target: Target, timeout_s: float, max_connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(
        base_url=target.base_url,
        headers=headers,
        limits=limits,
        timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
    )


def request_body(
    model: str, *, messages=None, prompt=None, max_tokens: int, ignore_eos: bool, stream: bool = True
) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def describe(exc: BaseException) -> str:
    """`Type: message`, falling back to the cause (httpx's ReadError often has no message)."""
    msg = str(exc) or str(exc.__cause__ or exc.__context__ or "") or "connection closed by the server"
    return f"{type(exc).__name__}: {' '.join(msg.split())[:100]}"


def _error_text(status: int, raw: bytes) -> str:
    try:
        msg = json.loads(raw)["error"]["message"]
    except Exception:  # not the OpenAI error shape
        msg = raw.decode("utf-8", "replace")
    return f"HTTP {status}: {' '.join(str(msg).split())[:120]}"


def _take_usage(result: RequestResult, usage: dict | None) -> None:
    if not usage:
        return
    if usage.get("completion_tokens") is not None:
        result.completion_tokens = int(usage["completion_tokens"])
        result.tokens_from_usage = True
    result.prompt_tokens = usage.get("prompt_tokens")
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


def _take_chunk(result: RequestResult, data: dict, now: float, texts: list[str]) -> None:
    if "error" in data:
        err = data["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        raise RuntimeError(f"error in stream: {' '.join(str(msg).split())[:120]}")
    for choice in data.get("choices") or []:
        delta = choice.get("delta") or {}
        if "delta" in choice:  # reasoning is output too: a thinking model's first tokens are its reasoning
            text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text = choice.get("text")
        if text:
            texts.append(text)
            result.chunk_times.append(now)
            if result.ttft is None:
                result.ttft = now
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    _take_usage(result, data.get("usage"))


async def stream_request(
    client: httpx.AsyncClient, path: str, body: dict, headers: dict | None = None
) -> RequestResult:
    """POST a streamed completion; time every content chunk. Never raises: errors are results."""
    result, texts, start, done = RequestResult(), [], time.perf_counter(), False
    try:
        async with client.stream("POST", path, json=body, headers=headers) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                result.error = _error_text(resp.status_code, await resp.aread())
                return result
            async for line in resp.aiter_lines():  # read to the end, so the connection is reused
                if done or not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    continue
                _take_chunk(result, json.loads(payload), time.perf_counter() - start, texts)
        result.latency = time.perf_counter() - start
        result.text = "".join(texts)
        if not result.tokens_from_usage:
            result.completion_tokens = len(result.chunk_times)  # one token per chunk, the OpenAI norm
        if not done:
            result.error = "stream ended without [DONE]"
        elif not result.chunk_times:
            result.error = "no content in stream"
        else:
            result.ok = True
    except httpx.TimeoutException as exc:
        result.error = f"timeout ({type(exc).__name__})"
    except (httpx.HTTPError, OSError) as exc:
        result.error = describe(exc)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        bad = str(exc) if isinstance(exc, RuntimeError) else f"bad stream: {type(exc).__name__}: {exc}"
        result.error = bad[:140]
    return result


async def cache_stats(client: httpx.AsyncClient, model: str) -> dict | None:
    """GET /v1/models/{model}/cache as {"cache": {...}, "engine": {...}}; None where the server has
    no such endpoint (404, or another shape: mlx_lm.server answers any /v1/models* with its list)."""
    try:
        resp = await client.get(f"/v1/models/{model}/cache", timeout=15.0)
        data = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("cache"), dict):
        return None
    engine = data.get("engine") if isinstance(data.get("engine"), dict) else {}
    return {"cache": data["cache"], "engine": engine}


# --- the server's model list, for suites that drive our own `serve run` -------------------------


def model_cards(base: str = BASE, timeout_s: float = 30) -> dict[str, dict]:
    """GET /v1/models: each model's card by id (ours adds `state`, footprint, last use, loads)."""
    return {m["id"]: m for m in httpx.get(f"{base}/v1/models", timeout=timeout_s).json()["data"]}


def model_states(base: str = BASE) -> dict[str, str | None]:
    """Each model's `state`, or {} while the server is not up yet."""
    try:
        return {name: card.get("state") for name, card in model_cards(base, timeout_s=5).items()}
    except (httpx.HTTPError, ValueError, KeyError):
        return {}


def wait_for_state(model: str, state: str, timeout_s: float = 300, base: str = BASE) -> None:
    """Poll once a second until MODEL is in STATE (loaded, unloaded, ...); exit the run if it never is."""
    deadline = time.time() + timeout_s
    while model_states(base).get(model) != state:
        if time.time() > deadline:
            raise SystemExit(f"{model} not {state} after {timeout_s:.0f} s: {model_states(base)}")
        time.sleep(1)


def post_empty(path: str, base: str = BASE, timeout_s: float = 60) -> None:
    """POST `{}` to PATH (e.g. /v1/models/NAME/unload); an HTTP error raises."""
    httpx.post(f"{base}{path}", json={}, timeout=timeout_s).raise_for_status()
