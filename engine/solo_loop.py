"""One request at a time on mlx_lm's own caches and `generate_step`, behind the loop's interface.

The loop of last resort, for a model that no batch serves right: the load-time batch check
(engine.batch_check) found even mlx_lm's BatchGenerator failing a prompt alone (llama4: its
chunked-attention cache cannot be merged into a batch, and its model builds that mask from one
offset for the whole batch). Here each request gets a fresh `make_prompt_cache` and mlx_lm's
`generate_step` — the way `mlx_lm.generate` runs any model — and the next waits for it to end.
No prefix reuse, no batching; the engine's stats say so (`batched: false`, `cache.path: mlx_lm`).
Sampling, penalties, grammars, thinking caps and logprobs work as in engine.mlx_lm_batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from .constraints import GrammarProcessor, Grammars
from .kv.interface import StepWrites
from .loop import Token
from .mlx_lm_batch import output_token, request_processors
from .request import Request


@dataclass
class _Solo:
    request_id: str
    tokens: list[int]
    max_tokens: int
    stops: frozenset[int]
    sampler: object
    processors: list
    grammar: GrammarProcessor | None
    top_logprobs: int | None
    produced: int = 0
    steps: object = None  # mlx_lm's generate_step generator, once started
    cache: list = field(default_factory=list)


class SoloLoop:
    """mlx_lm's `generate_step`, one request at a time, as a `Loop`."""

    compiled = None
    peak_batch = None

    def __init__(self, model, *, prefill_step_size: int, grammars: Grammars | None = None, **_sizes):
        self.model = model
        self.prefill_step_size = prefill_step_size
        self.grammars = grammars
        self.queue: deque[_Solo] = deque()
        self.current: _Solo | None = None

    def insert(self, request: Request, tokens: list[int], cached: int, stop_ids: list[int]) -> None:
        sampler, processors, grammar = request_processors(request, self.grammars)  # per request: may raise
        params = request.params
        top = params.top_logprobs if params.logprobs else None
        solo = _Solo(
            request.request_id, list(tokens), request.remaining, frozenset(stop_ids), sampler, processors, grammar, top
        )
        self.queue.append(solo)

    def remove(self, request: Request) -> None:
        if self.current is not None and self.current.request_id == request.request_id:
            self.current = None
        else:
            self.queue = deque(s for s in self.queue if s.request_id != request.request_id)

    def has_work(self) -> bool:
        return self.current is not None or bool(self.queue)

    def next_writes(self) -> StepWrites:
        return StepWrites()  # mlx_lm's caches grow outside the KV budget

    def step(self) -> list[Token]:
        """The current request's next token (its whole prompt first, in prefill_step_size chunks)."""
        if self.current is None:
            if not self.queue:
                return []
            self.current = solo = self.queue.popleft()
            solo.cache = make_prompt_cache(self.model)
            solo.steps = generate_step(
                mx.array(solo.tokens),
                self.model,
                max_tokens=solo.max_tokens,
                sampler=solo.sampler,
                logits_processors=solo.processors,
                prompt_cache=solo.cache,
                prefill_step_size=self.prefill_step_size,
            )
        solo = self.current
        token, logprobs = next(solo.steps)
        token = int(token)
        solo.produced += 1
        finish = "stop" if token in solo.stops else "length" if solo.produced >= solo.max_tokens else None
        out = output_token(solo.request_id, token, finish, solo.produced, solo.grammar, solo.top_logprobs, logprobs)
        if out.finish is not None:
            self.current = None
        return [out]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.current.cache) if self.current is not None else 0

    def close(self) -> None:
        self.queue.clear()
        self.current = None
