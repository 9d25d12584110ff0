"""Hostile request bodies for /v1/chat/completions, shared by the e2e test and benchmarks/lab/peer_checks.py.

Each value is the raw body (bytes) to POST with content-type application/json. A robust server
answers every one with a 4xx in the OpenAI error shape and stays healthy.
"""

from __future__ import annotations

import json

# OpenAI features a server may refuse instead of honouring (our router refuses these by name).
UNSUPPORTED = ("logit_bias", "audio")


def hostile_bodies(model: str) -> dict[str, bytes]:
    m, msg = model, [{"role": "user", "content": "hi"}]

    def body(**fields) -> bytes:
        return json.dumps({"model": m, "messages": msg, **fields}).encode()

    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], ' % m.encode()
    return {
        "model is a number": json.dumps({"model": 5, "messages": msg}).encode(),
        "messages is a string": body(messages="hi"),
        "max_tokens is a string": body(max_tokens="ten"),
        "huge max_tokens": body(max_tokens=10**30),
        "huge temperature": body(temperature=1e308),
        "huge seed": body(seed=10**40),
        "huge stop token id": body(stop_token_ids=[10**12]),
        "NaN": raw + b'"temperature": NaN}',
        "Infinity": raw + b'"top_p": Infinity}',
        "invalid UTF-8": b'{"model": "%s", "messages": [{"role": "user", "content": "\xff hi"}]}' % m.encode(),
        "1000 stop strings": body(stop=[f"s{i}" for i in range(1000)]),
        "deeply nested": raw[:-2] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "over the size limit": body(messages=[{"role": "user", "content": "x" * 2_000_000}]),
        "unknown field": body(frobnicate=1),
        "n > 1": body(n=2),
        "logit_bias": body(logit_bias={"1": 5}),
        "audio": body(audio={"voice": "alloy", "format": "wav"}),
        "top_logprobs without logprobs": body(top_logprobs=3),
        "top_logprobs 50": body(logprobs=True, top_logprobs=50),
        "a tool without a name": body(tools=[{"type": "function", "function": {"parameters": {}}}]),
        "tool_choice naming no tool": body(tool_choice={"type": "function", "function": {"name": "f"}}),
        "an unknown response_format": body(response_format={"type": "xml"}),
        "a schema that does not compile": body(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}},
            }
        ),
        "a forced tool whose parameters do not compile": body(
            tool_choice="required",
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
        ),
        "an image part": body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        "a made-up role": body(messages=[{"role": "wizard", "content": "hi"}]),
        "empty body": b"",
        "a list": b"[1, 2]",
        "null": b"null",
    }
