"""Server-sent events: the framing and headers every streamed API uses.

OpenAI streams `data: <json>` lines and ends with `data: [DONE]`; Anthropic names each event
(`event: <name>` before its data). JSON is compact and keeps non-ASCII text as it is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer a stream


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def sse_data(data: dict[str, Any] | str) -> bytes:
    """One unnamed event (OpenAI's framing); a string is sent as it is."""
    return f"data: {data if isinstance(data, str) else _json(data)}\n\n".encode()


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One named event (Anthropic's framing)."""
    return f"event: {name}\ndata: {_json(data)}\n\n".encode()


SSE_DONE = sse_data("[DONE]")


def event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)
