"""Thinking on the real SmolLM2, given a chat template that makes it think: the template's
variables per request and per model, reasoning_effort mapped onto them, and the cap on thinking
tokens (engine.thinking) in both batch loops."""

from __future__ import annotations

import asyncio

import pytest

from engine.config import EngineConfig
from engine.engine import AsyncEngine
from engine.errors import InvalidRequestError, ModelLoadError
from engine.request import PromptInput
from engine.sampling import SamplingParams
from engine.thinking import ThinkingCap

from ..conftest import SMOLLM
from .helpers import collect, run

# ChatML that opens a <think> block in the prompt unless enable_thinking is false (then it closes
# an empty one, as Qwen3's does). mlx_lm passes enable_thinking=False for a vocabulary without
# think tokens, so the model's config turns it on by default.
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking %}<think>\n"
    "{% else %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
Q = "What is 2+2?"


def ask(q: str = Q, **fields) -> PromptInput:
    return PromptInput(messages=[{"role": "user", "content": q}], **fields)


@pytest.fixture(scope="module", autouse=True)
def _one_load_per_model(load_once):
    """Every engine of this module shares its model's weights (tests/conftest.load_once)."""


@pytest.fixture(scope="module", params=["batch_loop", "mlx_lm"])
def thinker(request):
    config = EngineConfig(
        chat_template=THINKING,
        chat_template_kwargs={"enable_thinking": True},
        paged_cache=request.param == "batch_loop",
        cache_memory_mb=64,
    )
    eng = AsyncEngine.from_source(SMOLLM, config)
    yield eng
    eng.shutdown()


def prompt_text(engine, prompt: PromptInput) -> str:
    return engine.tokenizer.decode(engine.encode(prompt))


def test_the_model_s_default_opens_the_block_and_the_request_s_kwargs_or_effort_close_it(thinker):
    assert prompt_text(thinker, ask()).endswith("<think>\n")
    closed = "<think>\n\n</think>\n\n"
    assert prompt_text(thinker, ask(chat_template_kwargs={"enable_thinking": False})).endswith(closed)
    assert prompt_text(thinker, ask(reasoning_effort="none")).endswith(closed)
    assert prompt_text(thinker, ask(reasoning_effort="high")).endswith("<think>\n")
    assert prompt_text(thinker, ask(thinking=False)).endswith(closed)
    assert thinker.output_format(thinker.encode(ask())).in_reasoning
    assert not thinker.output_format(thinker.encode(ask(reasoning_effort="none"))).in_reasoning
    # a grammar decides a guided request's output from its first token: the answer, not reasoning
    assert not thinker.output_format(thinker.encode(ask()), guided=True).in_reasoning


def test_kwargs_the_template_does_not_read_or_that_contradict_the_effort_are_refused_by_name(thinker):
    with pytest.raises(InvalidRequestError) as err:
        thinker.encode(ask(chat_template_kwargs={"thinking_mode": "deep"}))
    assert err.value.param == "chat_template_kwargs.thinking_mode"
    with pytest.raises(InvalidRequestError) as err:
        thinker.encode(ask(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}))
    assert err.value.param == "reasoning_effort"


async def test_the_cap_forces_the_closing_tag_after_that_many_thinking_tokens(thinker):
    close = list(thinker.tokenizer.encode("</think>", add_special_tokens=False))
    free = (await run(thinker, ask(), temperature=0, max_tokens=12, ignore_eos=True))[1]
    text, ids, _ = await run(thinker, ask(), temperature=0, max_tokens=12, ignore_eos=True, max_thinking_tokens=4)
    assert ids[:4] == free[:4]
    assert ids[4 : 4 + len(close)] == close
    assert "</think>" in text and "</think>" not in thinker.tokenizer.decode(free)


async def test_greedy_requests_without_a_cap_are_unchanged_beside_a_capped_one(thinker):
    questions = ["Name 3 colors.", "What is Python?", "Capital of Japan?"]
    solo = [(await run(thinker, ask(q), temperature=0, max_tokens=10))[1] for q in questions]
    capped = thinker.submit(ask(), SamplingParams(temperature=0, max_tokens=10, max_thinking_tokens=2))
    others = [thinker.submit(ask(q), SamplingParams(temperature=0, max_tokens=10)) for q in questions]
    results = await asyncio.gather(collect(capped), *(collect(s) for s in others))
    assert "</think>" in results[0][0]
    assert [r[1] for r in results[1:]] == solo


async def test_the_model_s_cap_applies_to_every_request_and_a_request_may_ask_for_less(load_once):
    """With pipelined decoding too: a capped row's previous token is read before its next is sampled."""
    config = EngineConfig(
        chat_template=THINKING,
        chat_template_kwargs={"enable_thinking": True},
        max_thinking_tokens=6,
        pipelined_decode=True,
    )
    eng = AsyncEngine.from_source(SMOLLM, config)
    try:
        close = list(eng.tokenizer.encode("</think>", add_special_tokens=False))
        ids = (await run(eng, ask(), temperature=0, max_tokens=14, ignore_eos=True))[1]
        assert ids[6 : 6 + len(close)] == close
        ids = (await run(eng, ask(), temperature=0, max_tokens=14, ignore_eos=True, max_thinking_tokens=3))[1]
        assert ids[3 : 3 + len(close)] == close
    finally:
        eng.shutdown()


def test_a_model_default_the_template_does_not_read_stops_the_model_from_starting(load_once):
    with pytest.raises(ModelLoadError, match="enable_thinking"):
        AsyncEngine.from_source(SMOLLM, EngineConfig(chat_template_kwargs={"enable_thinking": True}))


def test_the_cap_counts_only_inside_the_block_and_a_tag_written_in_pieces():
    pieces = {1: "Hi ", 2: "<th", 3: "ink>", 4: "a", 5: "b", 6: "</", 7: "think>", 8: "c"}
    cap = ThinkingCap(2, ("<think>", "</think>"), [90, 91], pieces.__getitem__)
    for token in (1, 2, 3, 4):
        cap.consume(token)
        assert cap.forced() is None
    cap.consume(5)  # the second token inside: spent
    assert cap.forced() == 90
    cap.consume(90)
    assert cap.forced() == 91
    cap.consume(91)
    assert cap.forced() is None and not cap.inside
    own = ThinkingCap(5, ("<think>", "</think>"), [90], pieces.__getitem__, inside=True)
    for token in (4, 6, 7, 8):  # the model closes the block itself
        own.consume(token)
    assert not own.inside and own.forced() is None
