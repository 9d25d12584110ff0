"""bench_kv_quant's measurements checked against what they claim: the perplexity through the paged
cache at 16 bits is the model's own (mlx_lm's contiguous cache, one pass), 8 bits is close to it,
and the agreement arithmetic. On SmolLM2 and a short slice of the shipped text."""

import math

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from benchmarks import bench_kv_quant
from engine.loading.loader import load_model


def reference_perplexity(model, tokens: list[int]) -> float:
    logits = model(mx.array([tokens[:-1]]), cache=make_prompt_cache(model))[0].astype(mx.float32)
    targets = mx.array(tokens[1:])
    losses = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return math.exp(losses.mean().item())


def test_perplexity_through_the_paged_cache_in_chunks_is_the_models_own():
    loaded = load_model("smollm2-135m-instruct")
    tokens = loaded.tokenizer.encode(bench_kv_quant.TEXT.read_text())[:300]
    want = reference_perplexity(loaded.model, tokens)
    paged = bench_kv_quant.perplexity(loaded.model, tokens, 16, chunk=64)
    q8 = bench_kv_quant.perplexity(loaded.model, tokens, 8, chunk=64)
    q4 = bench_kv_quant.perplexity(loaded.model, tokens, 4, chunk=64)
    assert abs(paged / want - 1) < 1e-4
    assert abs(q8 / want - 1) < 0.01 < abs(q4 / want - 1)


def test_agreement_counts_identical_outputs_and_the_share_matched_before_the_first_difference():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]]
    other = [[1, 2, 3, 4], [5, 6, 0, 8], [1, 9]]
    assert bench_kv_quant.agreement(reference, other) == {"identical": 1, "prompts": 3, "matched_share": 0.5}
