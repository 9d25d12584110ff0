"""Plain helpers the engine's test modules share: a chat prompt, a request run to its end."""

from __future__ import annotations

from engine.request import PromptInput
from engine.sampling import SamplingParams


def chat(q: str) -> PromptInput:
    return PromptInput(messages=[{"role": "user", "content": q}])


async def collect(stream):
    """A stream read to its end: its text, its token ids and its outputs."""
    outs = [out async for out in stream]
    ids = [t for o in outs for t in o.token_ids]
    return "".join(o.text for o in outs), ids, outs


async def run(engine, prompt, **params):
    return await collect(engine.submit(prompt, SamplingParams(**params)))
