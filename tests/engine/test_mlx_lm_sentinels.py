"""Sentinels: mlx_lm behaviour (0.32.2, pinned) that the engine works around. Each test asserts the
behaviour as it is, so it FAILS the day an mlx_lm bump changes it; its docstring says what to do
then. They run on the tiny synthetic families (engine.loading.families), mlx_lm's own code only.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import ArraysCache, BatchKVCache, make_prompt_cache

from engine.loading.families import VOCAB
from engine.loading.loader import load_model


def prompts_of(*lengths: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, VOCAB, n)] for n in lengths]


def solo_last_logits(model, prompt: list[int]) -> mx.array:
    return model(mx.array([prompt]), cache=make_prompt_cache(model))[0, -1]


def batch_last_logits(model, prompts: list[list[int]]) -> mx.array:
    """mlx_lm's batched forward as its BatchGenerator sets it up: prompts left-padded, one
    BatchKVCache per layer, the mask the model builds from it ([B, 1, L, S])."""
    width = max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    tokens = mx.array([[0] * pad + p for pad, p in zip(padding, prompts)])
    cache = [BatchKVCache(left_padding=padding) for _ in make_prompt_cache(model)]
    logits = model(tokens, cache=cache)[:, -1]
    mx.eval(logits)
    return logits


def test_gemma2_attention_is_wrong_or_raises_under_mlx_lms_batch_mask():
    """mlx_lm 0.32.2's gemma2 attention reshapes the queries to [B, kv_heads, repeats, L, D] for
    grouped KV heads but keeps the [B, 1, L, S] batch mask, which then broadcasts against the KV-head
    axis: a batch of 2 raises a broadcast error; a batch of as many rows as KV heads (4 here, as in
    gemma-2-2b) runs, with each row's mask applied to another head — wrong logits, no error.

    When this fails, mlx_lm masks gemma2's grouped attention right: drop our workaround (gemma2's
    own mask in our step, or serving it unbatched) and expect gemma2 batched in
    tests/engine/test_families.py EXPECT."""
    prompts = prompts_of(3, 5, 7, 9)
    llama = load_model("synthetic:llama").model
    control = batch_last_logits(llama, prompts)
    assert all(mx.allclose(control[i], solo_last_logits(llama, p), atol=1e-3).item() for i, p in enumerate(prompts)), (
        "the control: llama's batch under the same padding and mask matches its solo logits"
    )
    model = load_model("synthetic:gemma2").model
    kv_heads = model.args.num_key_value_heads
    assert kv_heads == 4
    with pytest.raises(ValueError, match="broadcast"):
        batch_last_logits(model, prompts[:2])
    batched = batch_last_logits(model, prompts[:kv_heads])
    solo = [solo_last_logits(model, p) for p in prompts[:kv_heads]]
    wrong = [i for i, s in enumerate(solo) if not mx.allclose(batched[i], s, atol=1e-3).item()]
    assert wrong, "every row of a 4-row gemma2 batch matches its solo logits: mlx_lm's mask is right now"


def final_ssm_state(mixer, hidden: mx.array, lengths: list[int] | None) -> mx.array:
    """The Mamba2 mixer's SSM state after `hidden`, with `cache.lengths` set as BatchGenerator
    sets it for right-padded prompts (and the mask it builds from them)."""
    cache = ArraysCache(2)
    mask = None
    if lengths is not None:
        cache.prepare(lengths=lengths)
        mask = cache.make_mask(hidden.shape[1])
    mixer(hidden, mask=mask, cache=cache)
    mx.eval(cache[1])
    return cache[1]


def padded_and_solo_states(mixer, hidden_size: int) -> tuple[mx.array, mx.array]:
    """Row 1 of a right-padded batch (5 real tokens of 9) and the same 5 tokens alone."""
    hidden = mx.random.normal((2, 9, hidden_size), key=mx.random.key(1))
    padded = final_ssm_state(mixer, hidden, [9, 5])[1]
    alone = final_ssm_state(mixer, hidden[1:, :5], None)[0]
    return padded, alone


def test_nemotron_h_mamba_mixer_ignores_the_rows_lengths():
    """mlx_lm 0.32.2's nemotron_h Mamba2 mixer does not pass `cache.lengths` to `ssm_update`
    (granitemoehybrid's does): a right-padded row's SSM state runs on through the padding, so in a
    batch of prompts of different lengths the shorter ones decode from the wrong state.
    granitemoehybrid's mixer, under the same batch, keeps the row's state (the control).

    When this fails, mlx_lm's nemotron_h mixer honours the lengths: drop our workaround (serving
    nemotron_h unbatched, if our own recurrent-state handling does not already own the lengths)
    and expect nemotron_h batched in tests/engine/test_families.py EXPECT."""
    granite = load_model("synthetic:granitemoehybrid").model
    mixer = next(layer.mamba for layer in granite.model.layers if hasattr(layer, "mamba"))
    padded, alone = padded_and_solo_states(mixer, granite.args.hidden_size)
    assert mx.allclose(padded, alone, atol=1e-4).item(), "the control: granitemoehybrid keeps a padded row's state"

    nemotron = load_model("synthetic:nemotron_h").model
    mixer = next(layer.mixer for layer in nemotron.backbone.layers if layer.block_type == "M")
    padded, alone = padded_and_solo_states(mixer, nemotron.args.hidden_size)
    assert not mx.allclose(padded, alone, atol=1e-4).item(), "nemotron_h's mixer honours cache.lengths now"


def test_batch_generator_refuses_llama4s_chunked_cache():
    """mlx_lm 0.32.2's BatchGenerator merges per-prompt caches with `merge`, which ChunkedKVCache
    (llama4's chunked-attention layers) lacks: any prompt it prefills raises "does not yet support
    batching with history", so mlx_lm's loop cannot serve llama4 at all.

    When this fails, mlx_lm batches ChunkedKVCache: the fallback (engine.mlx_lm_batch) could serve
    llama4 again; keep ours if it is paged, but drop any code that exists only because mlx_lm could
    not (and re-check llama4 cache off in tests/engine/test_families.py)."""
    model = load_model("synthetic:llama4").model
    gen = BatchGenerator(model, completion_batch_size=4, prefill_batch_size=4, prefill_step_size=16)
    try:
        gen.insert(prompts_of(5, 11), max_tokens=[4, 4])
        with pytest.raises(ValueError, match="ChunkedKVCache.*does not yet support batching with history"):
            for _ in range(16):
                gen.next()
    finally:
        gen.close()
