"""A cap on a request's thinking: once it has spent its budget of tokens inside its reasoning
block, the block's closing tag is forced, token by token, and the answer follows.

Each capped request keeps a `ThinkingCap` (on its `Request`). The loop feeds it every output
token (`consume`) and, before sampling the request's next token, asks which token is forced
(`forced`); `force_tokens` masks the batch's logits to that token on the forced rows only. Rows
without a cap are never touched, and a batch without any capped row never calls these: their
outputs, greedy or seeded, are the same as without the feature. A request under a grammar
(structured output, forced tool calls) gets no cap: the grammar decides its whole output.

Where the block is, is read from the text (a tag may be several tokens, and a model may write it
in pieces): the cap keeps the last few characters of the decoded output and watches for the open
and close tags of the model's reasoning format (engine.chat_format.REASONING_TAGS).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx


class ThinkingCap:
    """One request's count of reasoning tokens, and the closing tag's tokens once it is spent.

    `limit` tokens inside the block in all (a block opened again counts on); `inside`: the
    prompt opened the block (engine.chat_format.OutputFormat.in_reasoning)."""

    def __init__(
        self,
        limit: int,
        tags: tuple[str, str],
        close_ids: list[int],
        decode: Callable[[int], str],
        inside: bool = False,
    ):
        self.limit = limit
        self.open_tag, self.close_tag = tags
        self.close_ids = list(close_ids)
        self.decode = decode
        self.inside = inside
        self.spent = 0  # tokens inside the block so far
        self.forcing: list[int] = []  # the closing tag's tokens still to come
        self._tail = ""  # the output's last characters, where a tag may be forming

    def consume(self, token: int) -> None:
        """The request's next output token (sampled, or the forced one)."""
        if self.forcing:
            self.forcing.pop(0)
            if not self.forcing:
                self.inside, self._tail = False, ""
            return
        self._tail = (self._tail + self.decode(token))[-2 * max(len(self.open_tag), len(self.close_tag)) :]
        if not self.inside:
            if self.open_tag in self._tail:
                self.inside, self._tail = True, self._tail.split(self.open_tag)[-1]
            return
        if self.close_tag in self._tail:
            self.inside, self._tail = False, ""
            return
        self.spent += 1
        if self.spent >= self.limit:
            self.forcing = list(self.close_ids)

    def forced(self) -> int | None:
        """The token that must come next, or None (the model chooses)."""
        return self.forcing[0] if self.forcing else None


def force_tokens(logits: mx.array, forced: list[int | None]) -> mx.array:
    """Logits [B, V] (or [V] for one row) where each row with a forced token allows only it."""
    if all(f is None for f in forced):
        return logits
    ids = mx.array([-1 if f is None else f for f in forced], dtype=mx.int32)
    vocab = mx.arange(logits.shape[-1], dtype=mx.int32)
    if logits.ndim == 1:
        keep = (ids[0] < 0) | (vocab == ids[0])
    else:
        keep = (ids[:, None] < 0) | (vocab[None, :] == ids[:, None])
    return mx.where(keep, logits, mx.array(-mx.inf, dtype=logits.dtype))


class CapProcessor:
    """A cap as an mlx_lm logits processor (mlx_lm's BatchGenerator loop): its n-th call samples
    output token n-1 and sees output token n-2 as the last of its context (the first call sees
    the prompt's last token), which it feeds to the cap first."""

    def __init__(self, cap: ThinkingCap):
        self.cap = cap
        self.calls = 0

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        self.calls += 1
        if self.calls > 1:
            self.cap.consume(int(context[-1].item()))
        forced = self.cap.forced()
        rows = logits.shape[0] if logits.ndim > 1 else 1
        return logits if forced is None else force_tokens(logits, [forced] * rows)
