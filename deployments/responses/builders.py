"""Response objects and their stream events, built from the router's events.

`OutputItems` turns the events of one model call (deployments.events) into the response's output
items, in the order the model wrote them: a `reasoning` item per run of reasoning, a `message`
item (one `output_text` part) per run of text, a `function_call` item per call. As it goes it
returns the stream events that build those items (`response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`, `response.reasoning_text.delta`,
`response.function_call_arguments.delta`, their `.done` events, `response.output_item.done`).
A whole response is the same items with the stream events dropped, so a streamed response and a
whole one have the same output by construction; `ResponseEvents` numbers the events and wraps
them in the lifecycle (`response.created`, `response.in_progress`, then `response.completed`,
`response.incomplete` or, when the model call fails, `error` and `response.failed`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..events import (
    Error,
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from ..http.errors import ApiError
from .protocol import ResponsesRequest

# Finish reasons that leave a response incomplete, and the reason OpenAI gives.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def usage(u: dict | None) -> dict[str, Any]:
    """The Responses usage of an engine usage. `cached_tokens`: prompt tokens the prefix cache
    served. `reasoning_tokens` is 0 unless the engine counts them (it reports them as
    `completion_tokens_details.reasoning_tokens`); `cache_write_tokens` is always 0: the prefix
    cache keeps prompts by itself, nothing is written on request."""
    u = u or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    prompt, completion = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class OutputItems:
    """One response's output items, built from its events; each call returns the stream events
    (without sequence numbers) that build them. The open item is the one text or reasoning is
    added to; anything else closes it."""

    def __init__(self):
        self.items: list[dict[str, Any]] = []
        self._open: tuple[str, int] | None = None  # (message | reasoning | call, output index)
        self._calls: dict[int, int] = {}  # a call's index among the calls -> its output index

    def feed(self, e: Event) -> list[dict[str, Any]]:
        if isinstance(e, TextDelta) and e.text:
            return self._text("message", e.text)
        if isinstance(e, ReasoningDelta) and e.text:
            return self._text("reasoning", e.text)
        if isinstance(e, ToolCallStart):
            item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": e.id}
            out = self._add({**item, "name": e.name, "arguments": ""}, "call")
            self._calls[e.index] = self._open[1]
            return out
        if isinstance(e, ToolCallArgsDelta) and e.text:
            index = self._calls[e.index]
            self.items[index]["arguments"] += e.text
            return [self._ref("response.function_call_arguments.delta", index, delta=e.text)]
        if isinstance(e, ToolCallEnd):
            return self._close_call(self._calls[e.index])
        return []

    def close(self, incomplete: bool = False) -> list[dict[str, Any]]:
        """The end of the output: the open item done (`incomplete`: cut off); a response with
        no output at all gets one empty message, so every answer has its assistant message."""
        out = [] if self.items else self._add(_message(), "message")
        if self._open is None:
            return out
        kind, index = self._open
        if kind == "call":
            return out + self._close_call(index, incomplete)
        self._open = None
        item = self.items[index]
        item["status"] = "incomplete" if incomplete else "completed"
        part = item["content"][0]
        done = "response.output_text.done" if kind == "message" else "response.reasoning_text.done"
        extra = {"logprobs": []} if kind == "message" else {}
        return out + [
            self._ref(done, index, content_index=0, text=part["text"], **extra),
            self._ref("response.content_part.done", index, content_index=0, part=dict(part)),
            {"type": "response.output_item.done", "output_index": index, "item": _copy(item)},
        ]

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        out = []
        if self._open is None or self._open[0] != kind:
            out = self._add(_message() if kind == "message" else _reasoning(), kind)
        index = self._open[1]
        self.items[index]["content"][0]["text"] += text
        delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        return out + [self._ref(delta, index, content_index=0, delta=text, **extra)]

    def _add(self, item: dict[str, Any], kind: str) -> list[dict[str, Any]]:
        """A new item (closing the open one), and its first events."""
        out = self.close() if self._open is not None else []
        index = len(self.items)
        self.items.append(item)
        self._open = (kind, index)
        added = {**item, "content": []} if "content" in item else dict(item)
        out.append({"type": "response.output_item.added", "output_index": index, "item": added})
        if "content" in item:
            out.append(self._ref("response.content_part.added", index, content_index=0, part=dict(item["content"][0])))
        return out

    def _close_call(self, index: int, incomplete: bool = False) -> list[dict[str, Any]]:
        item = self.items[index]
        if item["status"] != "in_progress":  # closed already (text came between a call's pieces)
            return []
        if self._open == ("call", index):
            self._open = None
        item["status"] = "incomplete" if incomplete or not _parses(item["arguments"]) else "completed"
        return [
            self._ref("response.function_call_arguments.done", index, arguments=item["arguments"], name=item["name"]),
            {"type": "response.output_item.done", "output_index": index, "item": _copy(item)},
        ]

    def _ref(self, kind: str, index: int, **data: Any) -> dict[str, Any]:
        return {"type": kind, "item_id": self.items[index]["id"], "output_index": index, **data}


def _message() -> dict[str, Any]:
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": [part]}


def _reasoning() -> dict[str, Any]:
    part = {"type": "reasoning_text", "text": ""}
    return {"id": new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [], "content": [part]}


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


def response_object(req: ResponsesRequest, response_id: str, created_at: int, **state: Any) -> dict[str, Any]:
    """The response resource: the request's settings echoed, and `state` (status, output, usage,
    error, incomplete_details, completed_at) as far as it is known."""
    text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {"format": {"type": "text"}}
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": req.model,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": None,
        "store": req.store,
        "temperature": req.temperature,
        "text": text,
        "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": req.user,
        "metadata": req.metadata or {},
        "completed_at": None,
        **state,
    }


class ResponseEvents:
    """One response, from the router's event batches: its stream events (numbered) and, at the
    end, the finished response (`final`)."""

    def __init__(self, req: ResponsesRequest, response_id: str):
        self.req, self.id = req, response_id
        self.created_at = int(time.time())
        self.output = OutputItems()
        self.finish_reason: str | None = None
        self.final: dict[str, Any] | None = None
        self._seq = 0

    def _numbered(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for e in events:
            e["sequence_number"] = self._seq
            self._seq += 1
        return events

    def _lifecycle(self, kind: str, **state: Any) -> dict[str, Any]:
        return {"type": kind, "response": response_object(self.req, self.id, self.created_at, **state)}

    def start(self) -> list[dict[str, Any]]:
        return self._numbered([self._lifecycle("response.created"), self._lifecycle("response.in_progress")])

    def feed(self, batch: list[Event]) -> list[dict[str, Any]]:
        """The stream events of one batch; the `[Usage]` batch ends the response (`final`)."""
        out: list[dict[str, Any]] = []
        for e in batch:
            if isinstance(e, Finish):
                self.finish_reason = e.reason
            elif isinstance(e, Usage):
                out += self._finish(e.usage)
            elif isinstance(e, Error):
                out += self._fail(e.error)
            else:
                out += self.output.feed(e)
        return self._numbered(out)

    def whole(self, events: list[Event]) -> dict[str, Any]:
        """The finished response of a whole (non-streamed) call's batch."""
        self.feed(events)
        return self.final

    def _finish(self, u: dict | None) -> list[dict[str, Any]]:
        reason = INCOMPLETE.get(self.finish_reason or "")
        out = self.output.close(incomplete=reason is not None)
        state: dict[str, Any] = {"status": "incomplete" if reason else "completed", "usage": usage(u)}
        if reason:
            state["incomplete_details"] = {"reason": reason}
        else:
            state["completed_at"] = int(time.time())
        self.final = response_object(self.req, self.id, self.created_at, output=self.output.items, **state)
        return out + [{"type": f"response.{state['status']}", "response": self.final}]

    def _fail(self, error: ApiError) -> list[dict[str, Any]]:
        """The call failed mid-stream: `error`, then the response as failed (with what it had)."""
        err = error.body["error"]
        code = err.get("code") or err.get("type") or "server_error"
        failed = {"code": code, "message": err["message"]}
        self.final = response_object(
            self.req, self.id, self.created_at, status="failed", error=failed, output=self.output.items
        )
        return [
            {"type": "error", "code": code, "message": err["message"], "param": err.get("param")},
            {"type": "response.failed", "response": self.final},
        ]
