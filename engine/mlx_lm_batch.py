"""mlx_lm's BatchGenerator behind the batch loop's interface (engine.loop.Loop).

It runs models whose caches the paged cache cannot hold (recurrent state, caches shared between
layers, ...) on mlx_lm's own contiguous caches, and is the reference the tests compare our loop
with. A grammar is a logits processor here, and logprobs come from its per-token
log-probabilities; sampling is mlx_lm's per-request sampler and penalty processors
(engine.sampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from .batch_sampling import best_logprobs
from .constraints import GrammarProcessor, Grammars
from .kv.interface import StepWrites
from .loop import Token
from .request import Request
from .sampling import make_processors, make_sampler
from .thinking import CapProcessor


@dataclass
class _Row:
    """What the loop keeps of one request: its grammar, its logprobs ask, its output so far."""

    request_id: str
    grammar: GrammarProcessor | None
    top_logprobs: int | None
    output: list[int] = field(default_factory=list)


class MlxLmBatch:
    """mlx_lm's BatchGenerator as a `Loop` (the cache manager hands it no K/V: mlx_lm makes its own)."""

    compiled = None  # mlx_lm's step is the model's own call
    peak_batch = None  # BatchGenerator does not report it

    def __init__(
        self,
        model,
        *,
        max_num_seqs: int,
        prefill_batch_size: int,
        prefill_step_size: int,
        grammars: Grammars | None = None,
    ):
        self.gen = BatchGenerator(
            model,
            completion_batch_size=max_num_seqs,
            prefill_batch_size=prefill_batch_size,
            prefill_step_size=prefill_step_size,
        )
        self.grammars = grammars
        self.rows: dict[int, _Row] = {}  # BatchGenerator's uid -> row
        self.uids: dict[str, int] = {}  # request id -> BatchGenerator's uid

    def insert(self, request: Request, tokens: list[int], cached: int, stop_ids: list[int]) -> None:
        sampler, processors, grammar = request_processors(request, self.grammars)  # per request: may raise
        (uid,) = self.gen.insert(
            [tokens[cached:]],
            max_tokens=[request.remaining],
            caches=None,
            all_tokens=[tokens[:cached]],  # penalties see the whole prompt
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[StopSequences([[t] for t in stop_ids])],
        )
        params = request.params
        self.rows[uid] = _Row(request.request_id, grammar, params.top_logprobs if params.logprobs else None)
        self.uids[request.request_id] = uid

    def remove(self, request: Request) -> None:
        uid = self.uids.pop(request.request_id, None)
        if uid is not None:
            self.rows.pop(uid, None)
            self.gen.remove([uid])

    def next_writes(self) -> StepWrites:
        return StepWrites()  # mlx_lm's caches grow outside the KV budget

    def step(self) -> list[Token]:
        _, responses = self.gen.next()
        out = []
        for r in responses:
            row = self.rows.get(r.uid)
            if row is None:
                continue
            token = self._token(row, r)
            if token.finish is not None:
                if r.finish_reason is None:  # the grammar ended it: BatchGenerator does not know
                    self.gen.remove([r.uid])
                self.rows.pop(r.uid, None)
                self.uids.pop(row.request_id, None)
            out.append(token)
        return out

    def _token(self, row: _Row, r) -> Token:
        row.output.append(r.token)
        return output_token(
            row.request_id, r.token, r.finish_reason, len(row.output), row.grammar, row.top_logprobs, r.logprobs
        )

    @property
    def nbytes(self) -> int:
        return self.gen.prompt_cache_nbytes

    def close(self) -> None:
        self.gen.close()


def request_processors(request: Request, grammars: Grammars | None) -> tuple:
    """A request as mlx_lm's loops take it: its sampler, its logits processors (penalties, its
    grammar, its thinking cap) and its grammar's processor (None without one). May raise."""
    params = request.params
    sampler, processors = make_sampler(params), make_processors(params)
    grammar = GrammarProcessor(grammars, request.constraint) if request.constraint is not None else None
    cap = [CapProcessor(request.cap)] if request.cap is not None else []
    return sampler, processors + ([grammar] if grammar is not None else []) + cap, grammar


def output_token(
    request_id: str,
    token: int,
    finish: str | None,
    produced: int,
    grammar: GrammarProcessor | None,
    top_logprobs: int | None,
    logprobs: mx.array,
) -> Token:
    """The `produced`-th output token of a request from mlx_lm's loops: a grammar that ends it
    makes it a stop; with logprobs asked, the chosen token's and the best `top_logprobs`."""
    if grammar is not None and finish is None:
        grammar.feed(produced - 1, token)
        finish = "stop" if grammar.constraint.stopped else None
    t = Token(request_id, token, finish)
    if top_logprobs is not None:
        chosen, top_ids, top_lps = (a.tolist() for a in best_logprobs(logprobs[None], mx.array([token]), top_logprobs))
        t.logprob, t.top = chosen[0], list(zip(top_ids[0], top_lps[0]))
    return t
