"""OpenAI response bodies and stream chunks for one request: text, tool calls, logprobs.

The model deployment streams chunks of text (with per-token logprob entries when asked); a
`ResponseBuilder` turns them into a `chat.completion` / `text_completion` body or a sequence of
`chat.completion.chunk` dicts. With tools, the text goes through a ToolCallParser: content is
streamed as it becomes safe to show, each tool call as one `delta.tool_calls` item (id, name
and its whole arguments) once its closing tag arrives, which the OpenAI SDK assembles as it
assembles OpenAI's own; the finish reason is then "tool_calls".
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from .tools import ToolCallParser


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


class ResponseBuilder:
    """Builds the JSON bodies and SSE chunks of one response (chat or text completion)."""

    def __init__(
        self,
        kind: Literal["chat", "text"],
        model: str,
        request_id: str,
        *,
        tools: bool = False,
        forced_tools: bool = False,
        logprobs: bool = False,
    ):
        self.kind, self.model, self.id = kind, model, request_id
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.parser = ToolCallParser(forced=forced_tools) if tools else None
        self.logprobs = logprobs
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

    def full(
        self, text: str, finish_reason: str | None, usage: dict | None, logprobs: list[dict] | None = None
    ) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.parser is not None:
                content, calls = self.parser.feed(text)
                content += self.parser.finish()
                message = {"role": "assistant", "content": content or (None if calls or self.parser.forced else "")}
                if calls:
                    message["tool_calls"] = calls
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            choice = {
                "index": 0,
                "message": message,
                "logprobs": self._logprobs(logprobs),
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}
        return {**self._base(self.object), "choices": [choice], "usage": usage, "system_fingerprint": None}

    # --- a stream ----------------------------------------------------------------------

    def deltas(self, text: str, logprobs: list[dict] | None = None, *, with_usage_field: bool = False) -> list[dict]:
        """The chunks for one piece of streamed output (the first always carries the role)."""
        calls: list[dict] = []
        if self.parser is not None:
            text, calls = self.parser.feed(text)
        out = []
        if text or self._first or (logprobs and not calls):
            out.append(self.chunk(text, logprobs=logprobs, with_usage_field=with_usage_field))
            logprobs = None
        out += [self._call_chunk(c, logprobs, with_usage_field) for c in calls]
        return out

    def final(self, finish_reason: str | None, *, with_usage_field: bool = False) -> list[dict]:
        """The closing chunks: held-back text, then the finish reason."""
        out = []
        if self.parser is not None:
            rest = self.parser.finish()
            if rest:
                out.append(self.chunk(rest, with_usage_field=with_usage_field))
            if self.parser.calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        return out + [self.chunk(None, finish_reason, with_usage_field=with_usage_field)]

    def _call_chunk(self, call: dict, logprobs: list[dict] | None, with_usage_field: bool) -> dict:
        index = self.parser.calls.index(call)
        chunk = self.chunk(None, logprobs=logprobs, with_usage_field=with_usage_field)
        chunk["choices"][0]["delta"]["tool_calls"] = [{"index": index, **call}]
        return chunk

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        logprobs: list[dict] | None = None,
        with_usage_field: bool = False,
    ) -> dict[str, Any]:
        first, self._first = self._first, False
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": self._logprobs(logprobs) if logprobs else None,
                "finish_reason": finish_reason,
            }
            out = {**self._base("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {
                "index": 0,
                "text": text or "",
                "logprobs": self._logprobs(logprobs) if logprobs else None,
                "finish_reason": finish_reason,
            }
            out = {**self._base("text_completion"), "choices": [choice]}
        if with_usage_field:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict | None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}
