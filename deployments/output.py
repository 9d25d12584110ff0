"""A model call's chunks as the router's event batches (deployments.events), parsed as the
request asks (deployments.parsers.Parsing) in the format its replica reports on the first chunk."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from engine.chat_format import OutputFormat

from .events import Error, Event, Finish, Logprobs, ReasoningDelta, TextDelta, Usage
from .hop import Chunk, merge_chunks
from .http.errors import ApiError
from .parsers import OutputParser, Parsing, make_parser


def _finish_reason(reason: str | None, parser: OutputParser | None) -> str | None:
    return "tool_calls" if parser is not None and parser.calls and reason == "stop" else reason


class OutputEvents:
    """One response's chunks as event batches; `parsing` None: all the text is content."""

    def __init__(self, parsing: Parsing | None = None):
        self.parsing = parsing
        self.parser: OutputParser | None = None
        self._first = True

    def chunk(self, chunk: Chunk) -> list[Event]:
        if self._first:
            self._first = False
            self.parser = make_parser(OutputFormat.from_dict(chunk.get("format")), self.parsing)
        text = chunk["text"]
        if self.parser is not None:
            out = self.parser.feed(text) if text else []
        else:
            out = [TextDelta(text)] if text else []
        if chunk.get("logprobs"):
            out.append(Logprobs(chunk["logprobs"]))
        return out

    def end(self, reason: str | None, stop_sequence: str | None = None) -> list[Event]:
        rest = self.parser.finish() if self.parser is not None else []
        return rest + [Finish(_finish_reason(reason, self.parser), stop_sequence)]


async def stream(chunks: AsyncIterable[Chunk], parsing: Parsing | None = None) -> AsyncIterator[list[Event]]:
    """A streamed response's batches; an ApiError from the chunks (the engine failed, the deadline
    passed) is the last batch, `[Error]`."""
    out, usage = OutputEvents(parsing), None
    try:
        async for chunk in chunks:
            yield out.chunk(chunk)
            if chunk["finish_reason"] is not None:
                usage = chunk["usage"]
                yield out.end(chunk["finish_reason"], chunk.get("stop_sequence"))
        yield [Usage(usage)]
    except ApiError as exc:
        yield [Error(exc)]


async def collect(chunks: AsyncIterable[Chunk], parsing: Parsing | None = None) -> list[Event]:
    """A whole response as one batch; raises the ApiError that ends the chunks, and a 502 when
    there were none. The parser reads the whole text at once."""
    received = [chunk async for chunk in chunks]
    if not received:
        raise ApiError(502, "the model ended the stream without output", type="server_error")
    whole = merge_chunks(received)
    out = OutputEvents(parsing)
    events = [e for e in out.chunk({**whole, "logprobs": []}) if not isinstance(e, Logprobs)]
    events = _joined(events + out.end(whole["finish_reason"])[:-1])
    finish = _finish_reason(whole["finish_reason"], out.parser)
    finished = Finish(finish, whole.get("stop_sequence"))
    return [*events, Logprobs(whole.get("logprobs") or []), finished, Usage(whole["usage"])]


def _joined(events: list[Event]) -> list[Event]:
    """Adjacent deltas of one kind as one (a whole response reads simpler that way)."""
    out: list[Event] = []
    for e in events:
        if out and isinstance(e, (TextDelta, ReasoningDelta)) and type(e) is type(out[-1]):
            out[-1] = type(e)(out[-1].text + e.text)
        else:
            out.append(e)
    return out
