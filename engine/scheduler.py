"""The continuous-batching loop of one model, synchronous and single-threaded.

With the paged cache it drives our own batch loop (engine.batch_loop); without it (or for a model
whose caches the paged cache cannot hold) mlx_lm's BatchGenerator, behind the same small
interface (`MlxLmBatch`). Both interleave one decode step of the running batch with one prefill
chunk (prefill_step_size tokens) of newly admitted prompts, so a long prompt never stalls decoding
sequences. On top of them this module keeps per-request state: stop strings, streaming with a
stream interval, usage, abort, and the KV cache seam
(`engine.kv.manager`): a request first waits here until the cache manager admits it (the paged
cache holds it back while its KV budget is taken, or while a running request is still computing
the same prompt prefix, which it then reuses), is inserted with the cache of its cached prefix,
and hands its cache back when it ends.

Simple mode is the same loop with a batch of one: requests wait in FIFO order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from .batch_loop import BatchLoop, Token
from .batch_sampling import best_logprobs
from .config import EngineConfig
from .constraints import Constraint, GrammarProcessor, Grammars, logits_width
from .errors import RequestFailedError
from .request import FinishReason, RequestOutput, Usage
from .sampling import SamplingParams, make_processors, make_sampler
from .text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One request inside the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    text: TextStream
    arrival: float = field(default_factory=time.monotonic)
    uid: int | None = None  # the batch's uid; None while waiting for admission
    kv: list | None = None  # the prompt cache from the cache manager (None without one)
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None
    constraint: Constraint | None = None  # its grammar (structured output); it lives with the request
    pending_logprobs: list[dict] | None = None  # with params.logprobs: one entry per pending token

    @property
    def tokens(self) -> list[int]:
        """What its cache must hold to go on: the prompt and, after a preemption, its output."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.output_ids)

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), len(self.output_ids), self.cached_tokens)


class Scheduler:
    def __init__(self, model, tokenizer, config: EngineConfig, cache_manager):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.cache = cache_manager
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.sequences: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()  # not admitted by the cache manager yet (FIFO)
        self._by_uid: dict[int, Sequence] = {}
        self.counters = {
            "requests": 0,
            "finished": 0,
            "aborted": 0,
            "rejected": 0,
            "preempted": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
        }
        self.rejected: list[tuple[str, Exception]] = []
        self.grammars = Grammars(tokenizer, logits_width(model), self.eos_ids)
        self.gen = self._make_batch()

    def _make_batch(self) -> BatchLoop | MlxLmBatch:
        cfg = self.config
        sizes = dict(
            max_num_seqs=cfg.max_num_seqs,
            prefill_batch_size=cfg.prefill_batch_size,
            prefill_step_size=cfg.prefill_step_size,
            grammars=self.grammars,
        )
        ctx = getattr(self.cache, "ctx", None)
        if ctx is not None:
            return BatchLoop(
                self.model,
                ctx,
                compiled=cfg.compiled_decode,
                pipelined=cfg.pipelined_decode,
                column_write=cfg.decode_column_write,
                unpadded=cfg.unpadded_decode,
                **sizes,
            )
        return MlxLmBatch(self.model, **sizes)

    # --- admission ---------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.sequences[seq.request_id] = seq
        self.waiting.append(seq)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(seq.prompt_ids)
        self._admit()

    def _admit(self) -> None:
        """Insert waiting requests, in order, while the cache manager admits them. A request that
        cannot be inserted fails alone (`take_rejected`); the others go on."""
        while self.waiting and self.cache.can_admit(self.waiting[0].tokens, self.waiting[0].remaining):
            seq = self.waiting.popleft()
            try:
                self._insert(seq)
            except Exception as exc:  # noqa: BLE001 - this request's own failure, not the batch's
                log.exception("request %s could not be started", seq.request_id)
                self._reject(seq, exc)

    def _insert(self, seq: Sequence) -> None:
        stops = ([] if seq.params.ignore_eos else self.eos_ids) + seq.params.stop_token_ids
        tokens = seq.tokens
        seq.kv, cached = self.cache.acquire(tokens, seq.remaining)
        if not seq.output_ids:
            seq.cached_tokens = cached
        seq.uid = self.gen.insert(
            seq.kv,
            tokens,
            cached,
            seq.remaining,
            seq.params,
            stops,
            start=len(seq.output_ids),
            constraint=seq.constraint,
        )
        self._by_uid[seq.uid] = seq

    def _preempt_for_room(self) -> None:
        """Before a step: while the running requests' next blocks do not fit the KV budget,
        preempt the newest (never the last one). vLLM's recompute preemption, made cheap by the
        prefix cache: its blocks are indexed, and it resumes from them when it is admitted again
        (first in line), unless they were evicted meanwhile."""
        headroom = getattr(self.cache, "headroom", None)
        room = headroom() if headroom is not None else None
        if room is None or room >= self.gen.blocks_needed_at_most():  # the common case: no per-row work
            return
        while self.gen.blocks_needed() > headroom():
            running = [s for s in self.sequences.values() if s.uid is not None and s.finish_reason is None]
            if len(running) <= 1:
                return
            self._preempt(max(running, key=lambda s: s.arrival))

    def _preempt(self, seq: Sequence) -> None:
        self.gen.remove(seq.uid)
        self._by_uid.pop(seq.uid, None)
        self.cache.store(seq.tokens[:-1], seq.kv)  # the K/V it holds: all but its newest token
        seq.kv, seq.uid = None, None
        self.waiting.appendleft(seq)
        self.counters["preempted"] += 1
        log.info("request %s preempted after %d tokens (KV budget full)", seq.request_id, len(seq.output_ids))

    def _fail_one(self, seq: Sequence, exc: Exception) -> None:
        """End one running request with an error; the batch and the prefix cache are untouched."""
        if seq.finish_reason is None and seq.request_id in self.sequences:
            self.gen.remove(seq.uid)
        self._by_uid.pop(seq.uid, None)
        self._reject(seq, RequestFailedError(f"this request failed in the engine: {type(exc).__name__}: {exc}"))

    def _reject(self, seq: Sequence, exc: Exception) -> None:
        if seq.kv is not None:
            self.cache.release(seq.kv)
            seq.kv = None
        self.sequences.pop(seq.request_id, None)
        self.counters["rejected"] += 1
        self.rejected.append((seq.request_id, exc))

    def take_rejected(self) -> list[tuple[str, Exception]]:
        """Requests that failed (to start, or alone while running) since the last call, with why."""
        out, self.rejected = self.rejected, []
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        if seq.uid is None:
            self.waiting.remove(seq)
        else:
            self.gen.remove(seq.uid)
        self.counters["aborted"] += 1
        return self._finish(seq, "abort")

    # --- stepping ----------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.sequences)

    def step(self) -> list[RequestOutput]:
        """One decode step of the running batch plus one prefill chunk; the outputs it produced."""
        self._admit()
        self._preempt_for_room()
        outputs, stopped = [], []
        for r in self.gen.step():
            seq = self._by_uid.get(r.uid)
            if seq is None:
                continue
            try:
                out = self._on_token(seq, r)
            except Exception as exc:  # noqa: BLE001 - this request's own work failed: end it alone
                log.exception("request %s failed while handling its token", seq.request_id)
                self._fail_one(seq, exc)
                continue
            if out is not None:
                outputs.append(out)
            if seq.finish_reason is None and seq.text.stopped:
                stopped.append(seq)
        for seq in stopped:  # a stop string ended these: take them out of the batch
            self.gen.remove(seq.uid)
            outputs.append(self._finish(seq, "stop"))
        return outputs

    def _on_token(self, seq: Sequence, r: Token) -> RequestOutput | None:
        token, finish = r.token, r.finish
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(token)
        self.counters["generated_tokens"] += 1
        if finish != "stop" or token not in self.eos_ids + seq.params.stop_token_ids:  # a stop token is never shown
            seq.pending_ids.append(token)
            seq.pending_text += seq.text.add(token)
            if seq.params.logprobs:
                if seq.pending_logprobs is None:
                    seq.pending_logprobs = []
                seq.pending_logprobs.append(self._logprob_entry(r))
        if finish is not None:
            return self._finish(seq, finish)
        if seq.text.stopped:
            return None
        if len(seq.pending_ids) >= self.config.stream_interval:
            return self._flush(seq)
        return None

    def _logprob_entry(self, r: Token) -> dict:
        decode = lambda t: self.tokenizer.decode([t])  # noqa: E731
        return {
            "id": r.token,
            "token": decode(r.token),
            "logprob": r.logprob,
            "top": [[t, decode(t), lp] for t, lp in r.top or ()],
        }

    def _flush(self, seq: Sequence) -> RequestOutput | None:
        if not seq.pending_ids and not seq.pending_text:
            return None
        out = RequestOutput(
            seq.request_id,
            seq.pending_text,
            seq.pending_ids,
            first_token_time=seq.first_token_time,
            logprobs=seq.pending_logprobs,
        )
        seq.pending_text, seq.pending_ids, seq.pending_logprobs = "", [], None
        return out

    def _finish(self, seq: Sequence, reason: FinishReason) -> RequestOutput:
        seq.finish_reason = reason
        seq.pending_text += seq.text.finish()
        self.sequences.pop(seq.request_id, None)
        self._by_uid.pop(seq.uid, None)
        self.counters["finished"] += 1
        if reason == "abort":
            self.cache.release(seq.kv)
        else:  # the K/V of the prompt and of every output token but the last is in the cache
            self.cache.store(seq.prompt_ids + seq.output_ids[:-1], seq.kv)
        seq.kv = None
        return RequestOutput(
            seq.request_id,
            seq.pending_text,
            seq.pending_ids,
            finish_reason=reason,
            usage=seq.usage(),
            first_token_time=seq.first_token_time,
            logprobs=seq.pending_logprobs,
        )

    def fail_all(self, exc: Exception) -> None:
        """After a failed step, whose cause no single request is known to be: every request in the
        batch ends with an error (`take_rejected`), and a fresh batch loop starts. Requests still
        waiting for admission were not part of it: they stay, and run next."""
        error = RequestFailedError(f"the engine step this request was part of failed: {type(exc).__name__}: {exc}")
        for seq in [s for s in self.sequences.values() if s.uid is not None]:
            self._by_uid.pop(seq.uid, None)
            self._reject(seq, error)
        self.gen.close()
        self.cache.clear()  # K/V written in that step may be half-done: drop the cached prefixes too
        self.gen = self._make_batch()
        mx.clear_cache()

    # --- introspection -----------------------------------------------------------------

    def stats(self) -> dict:
        running = sum(1 for s in self.sequences.values() if s.first_token_time is not None)
        compiled = getattr(self.gen, "compiled", None)
        return {
            "running": running,
            "waiting": len(self.sequences) - running,
            "kv_cache_bytes": self.gen.nbytes,
            "batch_peak": getattr(self.gen, "peak_batch", None),
            "compiled_steps": compiled.steps if compiled else 0,
            "compiled_shapes": len(compiled.shapes) if compiled else 0,  # traces made (rows x capacity)
            **self.counters,
        }


class MlxLmBatch:
    """mlx_lm's BatchGenerator behind the interface of `BatchLoop` (for caches it cannot page).
    A grammar is a logits processor here, and logprobs come from its per-token log-probabilities."""

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
        self.rows: dict[int, tuple[GrammarProcessor | None, int | None, list[int]]] = {}

    def insert(
        self,
        kv,
        prompt_ids: list[int],
        cached: int,
        max_tokens: int,
        params: SamplingParams,
        stop_ids: list[int],
        start: int = 0,
        constraint: Constraint | None = None,
    ) -> int:
        sampler, processors = make_sampler(params), make_processors(params)  # per request: may raise
        grammar = GrammarProcessor(self.grammars, constraint) if constraint is not None else None
        (uid,) = self.gen.insert(
            [prompt_ids[cached:]],
            max_tokens=[max_tokens],
            caches=[kv] if kv is not None else None,
            all_tokens=[prompt_ids[:cached]],  # penalties see the whole prompt
            samplers=[sampler],
            logits_processors=[processors + ([grammar] if grammar is not None else [])],
            stop_sequences=[StopSequences([[t] for t in stop_ids])],
        )
        self.rows[uid] = (grammar, params.top_logprobs if params.logprobs else None, [])
        return uid

    def remove(self, uid: int) -> None:
        self.rows.pop(uid, None)
        self.gen.remove([uid])

    def blocks_needed(self) -> int:
        return 0

    def blocks_needed_at_most(self) -> int:
        return 0

    def step(self) -> list[Token]:
        _, responses = self.gen.next()
        out = []
        for r in responses:
            if r.uid not in self.rows:
                continue
            token = self._token(r)
            if token.finish is not None:
                if r.finish_reason is None:  # the grammar ended it: BatchGenerator does not know
                    self.gen.remove([r.uid])
                self.rows.pop(r.uid, None)
            out.append(token)
        return out

    def _token(self, r) -> Token:
        grammar, k, output = self.rows[r.uid]
        output.append(r.token)
        finish = r.finish_reason
        if grammar is not None and finish is None:
            grammar.feed(len(output) - 1, r.token)
            finish = "stop" if grammar.constraint.stopped else None
        t = Token(r.uid, r.token, finish)
        if k is not None:
            chosen, top_ids, top_lps = (a.tolist() for a in best_logprobs(r.logprobs[None], mx.array([r.token]), k))
            t.logprob, t.top = chosen[0], list(zip(top_ids[0], top_lps[0]))
        return t

    @property
    def nbytes(self) -> int:
        return self.gen.prompt_cache_nbytes

    def close(self) -> None:
        self.gen.close()
