"""The GGUF loader against an independent implementation: llama.cpp.

tests/fixtures/llama_cpp_reference.json was produced by scripts/make_llama_cpp_reference.py with
llama-cpp-python 0.3.36 (llama.cpp built from its PyPI source, CPU) on the same two GGUF files:
tokenization of 20 strings (no BOS, special tokens parsed) and 16-token greedy continuations of
5 prompts with the top-1/top-2 logit margin at every step. CI does not rebuild llama.cpp.

Greedy continuations must match token for token, except that a divergence is accepted at a step
where llama.cpp's own top-2 margin is below MARGIN_SLACK logits: there two implementations with
different numerics (llama.cpp's quantized dot products vs our float32 weights) may pick either.
Everything after such a step is a different continuation and is not compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from engine.loader import load_model
from engine.sources import resolve_source

from .conftest import GEMMA, SMOLLM

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "llama_cpp_reference.json").read_text())
MARGIN_SLACK = 0.25
MODELS = {"smollm2": SMOLLM, "gemma3": GEMMA}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, smollm):
    key = request.param
    loaded = smollm if key == "smollm2" else load_model(MODELS[key])
    return REFERENCE["models"][key], loaded


def test_reference_is_for_these_files(case):
    import hashlib

    ref, loaded = case
    digest = hashlib.sha256(Path(resolve_source(loaded.source.original).location).read_bytes()).hexdigest()
    assert digest == ref["sha256"]


def test_tokenization_matches_llama_cpp(case):
    ref, loaded = case
    for item in ref["tokenize"]:
        assert loaded.tokenizer.encode(item["text"], add_special_tokens=False) == item["ids"], item["text"]


def test_greedy_continuations_match_llama_cpp(case):
    ref, loaded = case
    for item in ref["greedy"]:
        assert loaded.tokenizer.encode(item["prompt"]) == item["prompt_ids"], item["prompt"]
        ours = greedy(loaded.model, item["prompt_ids"], len(item["ids"]))
        diverged = next((i for i, (a, b) in enumerate(zip(ours, item["ids"])) if a != b), None)
        if diverged is not None:
            margin = item["margins"][diverged]
            assert margin < MARGIN_SLACK, (
                f"{item['prompt']!r}: diverged at step {diverged} where llama.cpp's margin is {margin:.3f}"
            )


def greedy(model, prompt: list[int], n: int) -> list[int]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    out = []
    for _ in range(n):
        token = mx.argmax(logits).item()
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return out
