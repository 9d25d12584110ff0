"""Sampling a whole batch in one graph (engine.batch_sampling), on made-up logits: greedy rows take
the argmax, the top-k / top-p / min-p thresholds keep what they should, penalties move the choice
away from seen tokens, and a seed samples the same tokens alone or inside any batch."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from engine.batch_sampling import BatchSampling, best_logprobs, filter_logprobs, row_key
from engine.sampling import SamplingParams

VOCAB = 64


def logits_of(rows: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=(rows, VOCAB)).astype(np.float32) * 3)


def sample(params: list[SamplingParams], logits: mx.array, positions: list[int], histories=None) -> list[int]:
    batch = BatchSampling.build(params, [row_key(p) for p in params], histories)
    inputs = mx.zeros((len(params),), dtype=mx.uint32)
    tokens, _ = batch.sample(logits, inputs, mx.array(positions, dtype=mx.uint32))
    return tokens.tolist()


def kept(logprobs: list[float], **limits) -> list[bool]:
    """Which tokens of one row pass `filter_logprobs` with these limits."""
    top_k = mx.array([[limits.get("top_k", 0)]], dtype=mx.int32)
    top_p = mx.array([[limits.get("top_p", 1.0)]])
    min_p = mx.array([[limits.get("min_p", 0.0)]])
    out = filter_logprobs(mx.array([logprobs]), top_k, top_p, min_p)
    return [v > -math.inf for v in out[0].tolist()]


def test_temperature_zero_takes_the_argmax_of_every_row():
    logits = logits_of(4)
    got = sample([SamplingParams(temperature=0)] * 4, logits, [0, 3, 7, 11])
    assert got == mx.argmax(logits, axis=-1).tolist()


def test_a_greedy_row_beside_sampled_rows_still_takes_its_argmax():
    logits = logits_of(3, seed=1)
    params = [SamplingParams(temperature=1.5, seed=1), SamplingParams(temperature=0), SamplingParams(temperature=2)]
    for position in range(5):
        assert sample(params, logits, [position] * 3)[1] == mx.argmax(logits[1]).item()


def test_top_k_one_is_the_argmax_at_any_temperature():
    logits = logits_of(2, seed=2)
    params = [SamplingParams(temperature=2.0, top_k=1, seed=s) for s in (5, 6)]
    for position in range(8):
        assert sample(params, logits, [position, position]) == mx.argmax(logits, axis=-1).tolist()


def test_the_thresholds_keep_what_they_promise():
    logprobs = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert kept(logprobs) == [True] * 4
    assert kept(logprobs, top_k=2) == [True, True, False, False]
    assert kept(logprobs, top_p=0.6) == [True, True, False, False]  # 0.5 alone is short of 0.6
    assert kept(logprobs, top_p=0.5) == [True, False, False, False]
    assert kept(logprobs, top_p=0.9) == [True, True, True, False]
    assert kept(logprobs, min_p=0.5) == [True, True, False, False]  # p >= 0.5 * 0.5
    assert kept(logprobs, top_k=3, min_p=0.2) == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    assert kept(logprobs, top_k=3, top_p=0.6) == [True, True, False, False]  # the tighter limit wins


def test_sampled_tokens_stay_inside_the_filters():
    logits = logits_of(1, seed=3)
    best_two = set(mx.argsort(-logits[0])[:2].tolist())
    params = [SamplingParams(temperature=2.0, top_k=2, seed=9)]
    assert {sample(params, logits, [p])[0] for p in range(30)} <= best_two


def test_penalties_move_the_choice_off_a_seen_token():
    logits = mx.array([[4.0, 3.0, 1.0, 0.0] + [-5.0] * (VOCAB - 4)])
    history = [[0, 0]]  # token 0 seen twice before this step's input (token 0 too: three times)
    plain = sample([SamplingParams(temperature=0)], logits, [0], history)
    assert plain == [0]
    for penalty in (dict(repetition_penalty=2.0), dict(presence_penalty=1.5), dict(frequency_penalty=0.5)):
        assert sample([SamplingParams(temperature=0, **penalty)], logits, [0], history) == [1], penalty
    # a penalty on another row leaves this one alone
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=1.5)]
    assert sample(params, mx.concatenate([logits, logits]), [0, 0], history * 2) == [0, 1]


def test_a_seed_samples_the_same_tokens_alone_and_in_any_batch():
    logits = mx.zeros((1, VOCAB))  # uniform: every draw is the noise's
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample([seeded], logits, [p])[0] for p in range(12)]
    neighbours = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, seed=7)]
    batch = mx.concatenate([logits] * 3)
    in_batch = [sample([neighbours[0], seeded, neighbours[1]], batch, [p + 5, p, 2 * p])[1] for p in range(12)]
    assert in_batch == alone
    assert len(set(alone)) > 1  # positions draw independently
    other = [sample([SamplingParams(temperature=1.0, seed=4321)], logits, [p])[0] for p in range(12)]
    assert other != alone


def test_best_logprobs_are_the_chosen_tokens_and_the_best_in_order():
    logprobs = mx.log(mx.array([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]))
    chosen, top_ids, top_lps = best_logprobs(logprobs, mx.array([2, 0]), 2)
    assert np.allclose(chosen.tolist(), [math.log(0.3), math.log(0.7)], atol=1e-6)
    assert top_ids.tolist() == [[1, 2], [0, 1]]
    assert np.allclose(top_lps.tolist(), [[math.log(0.6), math.log(0.3)], [math.log(0.7), math.log(0.2)]], atol=1e-6)
