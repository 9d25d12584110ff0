"""Sampling for a whole batch in one graph: every request's parameters as per-row arrays.

One decode step samples all rows at once: penalties from per-row token counts, top-k / top-p /
min-p as one per-row threshold over one sort, temperature as a per-row scale, and randomness from
per-row keys (`seed`, or one drawn at admission) folded with the row's token position, so a
seeded request samples the same tokens alone or beside any neighbours. Greedy rows take the
argmax. Nothing here runs per row per step on the host: the arrays are built when the batch
changes (`BatchSampling.build`) and the step only adds graph nodes (`sample`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .sampling import PENALTY_WINDOW, SamplingParams


def row_key(params: SamplingParams) -> np.ndarray:
    """The base random key of one request: from its seed, else fresh."""
    seed = params.seed % 2**64 if params.seed is not None else secrets.randbits(64)
    return np.array(mx.random.key(seed), dtype=np.uint32)


def needs_counts(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


@dataclass
class BatchSampling:
    """Per-row sampling arrays of one decode batch ([B] or [B, 1] each)."""

    greedy: bool  # every row greedy: a plain argmax
    inv_temp: mx.array
    is_greedy: mx.array
    top_k: mx.array | None  # None: no row filters
    top_p: mx.array | None
    min_p: mx.array | None
    keys: mx.array | None  # [B, 2] uint32 base keys; None when every row is greedy
    penalties: tuple[mx.array, mx.array, mx.array] | None  # repetition, presence, frequency [B, 1]
    histories: list[list[int]] | None = None  # each row's tokens so far, counted at the first step
    counts: mx.array | None = None  # [B, vocab] token counts (prompt + output) when penalties apply

    @classmethod
    def build(
        cls, params: list[SamplingParams], keys: list[np.ndarray], histories: list[list[int]] | None
    ) -> BatchSampling:
        """`histories`: each row's tokens so far (only read when some row has penalties)."""
        col = _column
        all_greedy = all(p.greedy for p in params)
        filters = any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params) and not all_greedy
        penalties = None
        if histories is not None and any(needs_counts(p) for p in params):
            penalties = (
                col([p.repetition_penalty for p in params]),
                col([p.presence_penalty for p in params]),
                col([p.frequency_penalty for p in params]),
            )
        return cls(
            greedy=all_greedy,
            inv_temp=col([0.0 if p.greedy else 1.0 / p.temperature for p in params]),
            is_greedy=mx.array([p.greedy for p in params]),
            top_k=col([p.top_k for p in params], mx.int32) if filters else None,
            top_p=col([p.top_p for p in params]) if filters else None,
            min_p=col([p.min_p for p in params]) if filters else None,
            keys=None if all_greedy else mx.array(np.stack(keys)),
            penalties=penalties,
            histories=histories if penalties is not None else None,
        )

    def sample(
        self, logits: mx.array, inputs: mx.array, positions: mx.array, top_logprobs: int | None = None
    ) -> tuple[mx.array, tuple[mx.array, mx.array, mx.array] | None]:
        """Next tokens [B] from logits [B, vocab]. `inputs` are the tokens this step consumed (they
        join the penalty counts first); `positions` each row's index of the token being sampled.
        With `top_logprobs` (some row asks for logprobs) also the chosen tokens' log-probabilities
        [B] and the best `top_logprobs` tokens and theirs [B, k], from the distribution after
        penalties and any grammar mask, before temperature and filters (as vLLM reports them)."""
        if self.penalties is not None:
            if self.counts is None:  # the vocabulary is the logits' width
                self.counts, self.histories = token_counts(self.histories, logits.shape[-1]), None
            rows = mx.arange(inputs.shape[0])
            self.counts = self.counts.at[rows, inputs].add(1.0)
            logits = apply_penalties(logits.astype(mx.float32), self.counts, *self.penalties)
        if self.greedy and top_logprobs is None:  # the argmax of the logits is the argmax of the logprobs
            return mx.argmax(logits, axis=-1), None
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = self._choose(logprobs, positions)
        if top_logprobs is None:
            return tokens, None
        return tokens, best_logprobs(logprobs, tokens, top_logprobs)

    def _choose(self, logprobs: mx.array, positions: mx.array) -> mx.array:
        best = mx.argmax(logprobs, axis=-1)
        if self.greedy:
            return best
        if self.top_k is not None:
            logprobs = filter_logprobs(logprobs, self.top_k, self.top_p, self.min_p)
        noise = mx.vmap(lambda key, pos: mx.random.gumbel(shape=logprobs.shape[-1:], key=fold(key, pos)))(
            self.keys, positions
        )
        sampled = mx.argmax(logprobs * self.inv_temp + noise, axis=-1)
        return mx.where(self.is_greedy, best, sampled)


def best_logprobs(logprobs: mx.array, tokens: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """The chosen tokens' log-probabilities [B], and the k most likely tokens and theirs [B, k]."""
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    k = max(1, k)
    top = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, top, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return (
        chosen.astype(mx.float32),
        mx.take_along_axis(top, order, axis=-1),
        mx.take_along_axis(values, order, axis=-1).astype(mx.float32),
    )


def fold(key: mx.array, position: mx.array) -> mx.array:
    """A key for one token position of one row: the row's key with the position added to its
    counter word (threefry is a keyed PRF, so distinct counters give independent draws)."""
    return mx.stack([key[0], key[1] + position.astype(mx.uint32)])


def token_counts(histories: list[list[int]], vocab: int) -> mx.array:
    counts = np.zeros((len(histories), vocab), dtype=np.float32)
    for i, tokens in enumerate(histories):
        if tokens:
            np.add.at(counts[i], np.asarray(tokens[-PENALTY_WINDOW:], dtype=np.int64) % vocab, 1.0)
    return mx.array(counts)


def apply_penalties(logits: mx.array, counts: mx.array, repetition, presence, frequency) -> mx.array:
    """mlx_lm's three penalties, per row: repetition scales a seen token's logit (divides a
    positive one, multiplies a negative one), presence subtracts once, frequency per occurrence."""
    seen = counts > 0
    scaled = mx.where(logits < 0, logits * repetition, logits / repetition)
    logits = mx.where(seen, scaled, logits)
    return logits - presence * seen - frequency * counts


def filter_logprobs(logprobs: mx.array, top_k: mx.array, top_p: mx.array, min_p: mx.array) -> mx.array:
    """Keep, per row, the tokens that pass top-k (k > 0), top-p (< 1) and min-p (> 0): one sort,
    one threshold per row."""
    vocab = logprobs.shape[-1]
    desc = -mx.sort(-logprobs, axis=-1)
    k = mx.where(top_k > 0, mx.minimum(top_k, vocab), vocab)  # [B, 1]
    ranks = mx.arange(vocab)[None, :]
    in_k = ranks < k
    kept = mx.where(in_k, desc, -mx.inf)
    probs = mx.exp(kept - mx.logsumexp(kept, axis=-1, keepdims=True))
    before = mx.cumsum(probs, axis=-1) - probs  # mass of the better tokens
    n_keep = mx.maximum(mx.sum((before < top_p) & in_k, axis=-1, keepdims=True), 1)
    threshold = mx.take_along_axis(desc, n_keep - 1, axis=-1)
    floor = desc[:, :1] + mx.log(mx.maximum(min_p, 1e-30))
    threshold = mx.where(min_p > 0, mx.maximum(threshold, floor), threshold)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def _column(values, dtype=mx.float32) -> mx.array:
    """Per-row values as a `[rows, 1]` column."""
    return mx.array(values, dtype=dtype)[:, None]
