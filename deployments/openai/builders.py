"""OpenAI response bodies and stream chunks for one request, built from the router's events.

A `ResponseBuilder` renders a whole response (`output.collect`) as a `chat.completion` /
`text_completion` body, and a stream's batches (`output.stream`) as `chat.completion.chunk` /
`text_completion` dicts. The first chunk always carries the role; reasoning is `reasoning_content`
beside `content`; a tool call streams as OpenAI's do: a `delta.tool_calls` item with its index,
id, name and empty arguments, then items with pieces of its arguments, which the OpenAI SDK
assembles; logprobs come in the chat shape or the completions (legacy) shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from ..events import (
    Error,
    Event,
    Finish,
    Logprobs,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_logprobs(entries: list[dict]) -> dict[str, Any]:
    """Engine logprob entries ({"id", "token", "logprob", "top": [[id, token, logprob]]}) in the
    chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal"}."""

    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for _, t, lp in e["top"]]} for e in entries
        ],
        "refusal": None,
    }


def _delta(e: Event) -> dict[str, Any] | None:
    """A chat stream's delta for one event (None: the event adds nothing to a delta)."""
    if isinstance(e, TextDelta):
        return {"content": e.text} if e.text else None
    if isinstance(e, ReasoningDelta):
        return {"reasoning_content": e.text} if e.text else None
    if isinstance(e, ToolCallStart):
        function = {"name": e.name, "arguments": ""}
        return {"tool_calls": [{"index": e.index, "id": e.id, "type": "function", "function": function}]}
    if isinstance(e, ToolCallArgsDelta):
        return {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]} if e.text else None
    return None


def _join(into: dict[str, Any], delta: dict[str, Any]) -> bool:
    """Adds `delta` to the previous delta when both are text of one kind, or arguments of one call."""
    for key in ("content", "reasoning_content"):
        if key in delta and key in into:
            into[key] += delta[key]
            return True
    if "tool_calls" in delta and "tool_calls" in into:
        last, new = into["tool_calls"][-1], delta["tool_calls"][0]
        if last["index"] == new["index"] and set(new) == {"index", "function"}:
            last["function"]["arguments"] += new["function"]["arguments"]
            return True
    return False


def tool_calls(events: list[Event]) -> list[dict[str, Any]]:
    """The complete calls among `events`, as OpenAI tool_calls items with their `index`."""
    names: dict[int, tuple[str, str]] = {}
    arguments: dict[int, str] = {}
    out = []
    for e in events:
        if isinstance(e, ToolCallStart):
            names[e.index], arguments[e.index] = (e.id, e.name), ""
        elif isinstance(e, ToolCallArgsDelta):
            arguments[e.index] += e.text
        elif isinstance(e, ToolCallEnd):
            call_id, name = names[e.index]
            function = {"name": name, "arguments": arguments[e.index]}
            out.append({"index": e.index, "id": call_id, "type": "function", "function": function})
    return out


class ResponseBuilder:
    """Builds the JSON body or the SSE chunks of one response (chat or text completion).

    `tools`: the output is parsed for tool calls (`forced`: a grammar forces them);
    `include_usage`: every chunk has a `usage` field and the stream ends with a usage chunk."""

    def __init__(
        self,
        kind: Literal["chat", "text"],
        model: str,
        request_id: str,
        *,
        tools: bool = False,
        forced_tools: bool = False,
        logprobs: bool = False,
        include_usage: bool = False,
    ):
        self.kind, self.model, self.id = kind, model, request_id
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.tools, self.forced = tools, forced_tools
        self.logprobs, self.include_usage = logprobs, include_usage
        self._offset = 0  # text offset of the next token (completions' logprobs)
        self._first = True

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[dict] | None) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        entries = entries or []
        if self.kind == "chat":
            return chat_logprobs(entries)
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t: lp for _, t, lp in e["top"]} for e in entries],
            "text_offset": offsets,
        }

    # --- a whole response ---------------------------------------------------------------

    def full(self, events: list[Event]) -> dict[str, Any]:
        """The body of a whole response (`output.collect`'s batch)."""
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        logprobs = [x for e in events if isinstance(e, Logprobs) for x in e.entries]
        finish = next((e.reason for e in events if isinstance(e, Finish)), None)
        usage = next((e.usage for e in events if isinstance(e, Usage)), None)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls(events)]
            if self.tools:
                message["content"] = text or (None if calls or self.forced else "")
            if calls:
                message["tool_calls"] = calls
            if reasoning:
                message["reasoning_content"] = reasoning
            choice = {"index": 0, "message": message, "logprobs": self._logprobs(logprobs), "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish}
        return {**self._base(self.object), "choices": [choice], "usage": usage, "system_fingerprint": None}

    # --- a stream ----------------------------------------------------------------------

    def chunks(self, batch: list[Event]) -> list[dict[str, Any]]:
        """The stream items of one batch of `output.stream`; an error is its OpenAI body."""
        if batch and isinstance(batch[0], Error):
            return [batch[0].error.body]
        if batch and isinstance(batch[0], Usage):
            return [self.usage_chunk(batch[0].usage)] if self.include_usage else []
        if batch and isinstance(batch[-1], Finish):
            rest = "".join(e.text for e in batch if isinstance(e, TextDelta))
            return ([self.chunk(rest)] if rest else []) + [self.chunk(None, batch[-1].reason)]
        return self._deltas(batch)

    def _deltas(self, batch: list[Event]) -> list[dict[str, Any]]:
        """One replica chunk's output, in order: its content, reasoning and call pieces as deltas
        (adjacent pieces of one kind joined), the batch's logprobs on the first; the first chunk
        of the stream always goes, for the role."""
        deltas: list[dict[str, Any]] = []
        for e in batch:
            delta = _delta(e)
            if delta is None:
                continue
            if not deltas or not _join(deltas[-1], delta):
                deltas.append(delta)
        logprobs = [x for e in batch if isinstance(e, Logprobs) for x in e.entries] or None
        if self.kind == "text":
            text = "".join(d.get("content", "") for d in deltas)
            return [self.chunk(text, logprobs=logprobs)] if text or logprobs or self._first else []
        if not deltas and (self._first or logprobs):
            deltas.append({"content": ""})
        out = []
        for delta in deltas:
            chunk = self.chunk(None, logprobs=logprobs)
            chunk["choices"][0]["delta"].update(delta)
            out.append(chunk)
            logprobs = None
        return out

    def chunk(
        self, text: str | None, finish_reason: str | None = None, *, logprobs: list[dict] | None = None
    ) -> dict[str, Any]:
        first, self._first = self._first, False
        lp = self._logprobs(logprobs) if logprobs else None
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            out = {**self._base("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
            out = {**self._base("text_completion"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict | None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}
