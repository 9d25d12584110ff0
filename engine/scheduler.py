"""The continuous-batching loop of one model, synchronous and single-threaded.

With the paged cache it drives our own batch loop (engine.batch_loop); without it (or for a model
whose caches the paged cache cannot hold) mlx_lm's BatchGenerator (engine.mlx_lm_batch), behind
the same interface (engine.loop.Loop). Both interleave one decode step of the running batch with
one prefill chunk (prefill_step_size tokens) of newly admitted prompts, so a long prompt never
stalls decoding sequences. On top of them this module keeps per-request state (one `Request` per
request): stop strings, streaming with a stream interval, usage, abort, and the KV cache seam
(engine.kv.interface.CacheManager): a request first waits here until the cache manager admits it
(the paged cache holds it back while its KV budget is taken, or while a running request is still
computing the same prompt prefix, which it then reuses), is inserted with the blocks of its cached
prefix, and hands its blocks back when it ends. Before every step the cache manager says whether
the running requests' next writes fit; while they do not, the newest is preempted.

Simple mode is the same loop with a batch of one: requests wait in FIFO order.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import mlx.core as mx

from .batch_loop import BatchLoop
from .config import EngineConfig
from .constraints import Grammars, logits_width
from .errors import AdapterLoadError, RequestFailedError
from .kv.interface import CacheManager
from .loop import Loop, Token
from .mlx_lm_batch import MlxLmBatch
from .request import FinishReason, Request, RequestOutput
from .solo_loop import SoloLoop

log = logging.getLogger(__name__)
ADAPTER_WAIT_S = 0.05  # with nothing running, the loop waits this long at most for an adapter's read


class Scheduler:
    """The requests of one model over its batch loop and its cache manager (the loop thread only)."""

    def __init__(
        self,
        model,
        tokenizer,
        config: EngineConfig,
        cache_manager: CacheManager,
        solo: bool = False,
        vision=None,
        drafter=None,
        adapters=None,
    ):
        self.model = model
        self.adapters = adapters  # LoRA adapters (engine.adapters), when the config names some
        self.drafter = drafter  # speculation's draft model (engine.draft_model), when the config names one
        self.vision = vision  # a vision model's encoder (engine.vision.encoder): images encoded at admission
        self.embed = vision.embed if vision is not None else None  # image rows prefill from embeddings
        self.solo = solo  # one request at a time on mlx_lm's own caches (engine.solo_loop)
        self.tokenizer = tokenizer
        self.config = config
        self.cache = cache_manager
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.requests: dict[str, Request] = {}  # running and waiting, by request id
        self.waiting: deque[Request] = deque()  # not admitted by the cache manager yet (FIFO)
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
        self.gen = self._make_loop()
        if adapters is not None and not isinstance(self.gen, BatchLoop):
            adapters.refuse_all("adapters are served only on our batch loop over the paged cache (paged_cache on)")

    @property
    def takes_images(self) -> bool:
        """Image rows need our batch loop (the prefill from embeddings)."""
        return isinstance(self.gen, BatchLoop) and self.embed is not None

    def _make_loop(self) -> Loop:
        """Our loop over the cache's paged K/V, or mlx_lm's BatchGenerator when it keeps none (or
        mlx_lm's generate_step one request at a time, for a model no batch serves: `solo`)."""
        cfg = self.config
        sizes = dict(
            max_num_seqs=cfg.max_num_seqs,
            prefill_batch_size=cfg.prefill_batch_size,
            prefill_step_size=cfg.prefill_step_size,
            grammars=self.grammars,
        )
        kv = self.cache.batch_kv()
        if cfg.speculative.method and (self.solo or kv is None):
            log.warning("speculative decoding is off for this model: it needs our batch loop over the paged cache")
        if self.solo:
            return SoloLoop(self.model, **sizes)
        if kv is None:
            return MlxLmBatch(self.model, **sizes)
        speculative = cfg.speculative if cfg.speculative.method else None
        if speculative is not None and kv.recurrent:
            log.warning("speculative decoding is off for this model: its recurrent state cannot be cut back")
            speculative = None
        # A recurrent model's decode step is the model's own call (the compiled step takes K/V
        # only), and unpipelined: a row's state is then always exactly its tokens' (snapshots).
        return BatchLoop(
            self.model,
            kv,
            compiled=cfg.compiled_decode and not kv.recurrent,
            pipelined=False if kv.recurrent else cfg.pipelined_decode,
            column_write=cfg.decode_column_write,
            unpadded=cfg.unpadded_decode,
            embed=self.embed,
            speculative=speculative,
            drafter=self.drafter,
            room=self.cache.can_allocate,
            lora=self.adapters.table if self.adapters is not None else None,
            **sizes,
        )

    # --- admission ---------------------------------------------------------------------

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)
        if req.adapter is not None:
            self.adapters.enter(req.adapter)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(req.prompt_ids)
        self._admit()

    def _admit(self) -> None:
        """Insert waiting requests, in order, while the cache manager admits them. A request that
        cannot be inserted fails alone (`take_rejected`); the others go on. A request whose
        adapter is not resident yet keeps its place and lets the ones behind it go first."""
        held: list[Request] = []
        while self.waiting:
            req = self.waiting[0]
            try:
                ready = req.adapter is None or self._bind_adapter(req)
            except AdapterLoadError as exc:
                self.waiting.popleft()
                self._reject(req, exc)
                continue
            if not ready:
                held.append(self.waiting.popleft())
                continue
            if not self.cache.can_admit(req.cache_tokens, req.remaining):
                break
            self.waiting.popleft()
            try:
                self._insert(req)
            except Exception as exc:  # noqa: BLE001 - this request's own failure, not the batch's
                log.exception("request %s could not be started", req.request_id)
                self._reject(req, exc)
        self.waiting.extendleft(reversed(held))

    def _bind_adapter(self, req: Request) -> bool:
        """Whether the request's adapter is resident (its load starts when a slot can be had); if
        so the request takes its slot and its prefix-cache salt. AdapterLoadError when it failed."""
        slot = self.adapters.ready(req.adapter)
        if slot:
            req.lora_slot, req.cache_salt = slot, self.adapters.states[req.adapter].digest
        return bool(slot)

    def _poll_adapters(self) -> None:
        """Adapters read since the last step go into their slots; while nothing runs and a read is
        under way, wait for it a little rather than spin."""
        adapters = self.adapters
        if adapters is None or not adapters.loading:
            return
        if not any(r.running for r in self.requests.values()):
            adapters.wait(ADAPTER_WAIT_S)
        adapters.poll()

    def _ended(self, req: Request) -> None:
        """A request leaves the scheduler (finished, aborted or failed): exactly once."""
        if self.requests.pop(req.request_id, None) is not None and req.adapter is not None:
            self.adapters.leave(req.adapter)

    def _insert(self, req: Request) -> None:
        stops = ([] if req.params.ignore_eos else self.eos_ids) + req.params.stop_token_ids
        req.blocks, cached = self.cache.acquire(req.cache_tokens, req.remaining)
        if req.vision is not None:  # the images whose tokens are not all cached go through the encoder
            self.vision.encode(req.vision, after=cached)
        if not req.output_ids:
            req.cached_tokens = cached
        self.gen.insert(req, req.tokens, cached, stops)
        req.running = True

    def _preempt_for_room(self) -> None:
        """Before a step: while the cache manager says the running requests' next writes do not
        fit the KV budget, preempt the newest (never the last one). vLLM's recompute preemption,
        made cheap by the prefix cache: its blocks are indexed, and it resumes from them when it
        is admitted again (first in line), unless they were evicted meanwhile."""
        while not self.cache.can_allocate(self.gen.next_writes()):
            running = [r for r in self.requests.values() if r.running and r.finish_reason is None]
            if len(running) <= 1:
                return
            self._preempt(max(running, key=lambda r: r.arrival))

    def _preempt(self, req: Request) -> None:
        self.gen.remove(req)
        self.cache.store(req.cache_tokens[:-1], req.blocks)  # the K/V it holds: all but its newest token
        req.blocks, req.running = None, False
        self.waiting.appendleft(req)
        self.counters["preempted"] += 1
        log.info("request %s preempted after %d tokens (KV budget full)", req.request_id, len(req.output_ids))

    def _fail_one(self, req: Request, exc: Exception) -> None:
        """End one running request with an error; the batch and the prefix cache are untouched."""
        if req.finish_reason is None and req.request_id in self.requests:
            self.gen.remove(req)
        req.running = False
        self._reject(req, RequestFailedError(f"this request failed in the engine: {type(exc).__name__}: {exc}"))

    def _reject(self, req: Request, exc: Exception) -> None:
        if req.blocks is not None:
            self.cache.release(req.blocks)
            req.blocks = None
        self._ended(req)
        self.counters["rejected"] += 1
        self.rejected.append((req.request_id, exc))

    def take_rejected(self) -> list[tuple[str, Exception]]:
        """Requests that failed (to start, or alone while running) since the last call, with why."""
        out, self.rejected = self.rejected, []
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        if not req.running:
            self.waiting.remove(req)
        else:
            self.gen.remove(req)
        self.counters["aborted"] += 1
        return self._finish(req, "abort")

    # --- stepping ----------------------------------------------------------------------

    def has_work(self) -> bool:
        """Requests to step, or an adapter's read to finish (an operator's load waits on it)."""
        return bool(self.requests) or (self.adapters is not None and self.adapters.loading)

    def step(self) -> list[RequestOutput]:
        """One decode step of the running batch plus one prefill chunk; the outputs it produced."""
        self._poll_adapters()
        self._admit()
        self._preempt_for_room()
        outputs, stopped = [], []
        self.cache.begin_step()
        for t in self.gen.step():
            req = self.requests.get(t.request_id)
            if req is None or not req.running or req.text.stopped:  # a stop string ended it this step
                continue
            try:
                out = self._on_token(req, t)
            except Exception as exc:  # noqa: BLE001 - this request's own work failed: end it alone
                log.exception("request %s failed while handling its token", req.request_id)
                self._fail_one(req, exc)
                continue
            if out is not None:
                outputs.append(out)
            if req.finish_reason is None and req.text.stopped:
                stopped.append(req)
        for req in stopped:  # a stop string ended these: take them out of the batch
            self.gen.remove(req)
            outputs.append(self._finish(req, "stop"))
        return outputs

    def _on_token(self, req: Request, t: Token) -> RequestOutput | None:
        token, finish = t.token, t.finish
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        req.output_ids.append(token)
        self.counters["generated_tokens"] += 1
        if finish != "stop" or token not in self.eos_ids + req.params.stop_token_ids:  # a stop token is never shown
            req.pending_ids.append(token)
            req.pending_text += req.text.add(token)
            if req.params.logprobs:
                if req.pending_logprobs is None:
                    req.pending_logprobs = []
                req.pending_logprobs.append(self._logprob_entry(t))
        if finish is not None:
            return self._finish(req, finish)
        if req.text.stopped:
            return None
        if len(req.pending_ids) >= self.config.stream_interval:
            return self._flush(req)
        return None

    def _logprob_entry(self, r: Token) -> dict:
        decode = lambda t: self.tokenizer.decode([t])  # noqa: E731 - a one-line local helper
        return {
            "id": r.token,
            "token": decode(r.token),
            "logprob": r.logprob,
            "top": [[t, decode(t), lp] for t, lp in r.top or ()],
        }

    def _flush(self, req: Request) -> RequestOutput | None:
        if not req.pending_ids and not req.pending_text:
            return None
        out = RequestOutput(
            req.request_id,
            req.pending_text,
            req.pending_ids,
            first_token_time=req.first_token_time,
            logprobs=req.pending_logprobs,
        )
        req.pending_text, req.pending_ids, req.pending_logprobs = "", [], None
        return out

    def _finish(self, req: Request, reason: FinishReason) -> RequestOutput:
        req.finish_reason = reason
        req.pending_text += req.text.finish()
        self._ended(req)
        req.running = False
        self.counters["finished"] += 1
        if reason == "abort":
            self.cache.release(req.blocks)
        else:  # the K/V of the prompt and of every output token but the last is in the cache
            self.cache.store(req.cache_tokens[: len(req.prompt_ids) + len(req.output_ids) - 1], req.blocks)
        req.blocks = None
        return RequestOutput(
            req.request_id,
            req.pending_text,
            req.pending_ids,
            finish_reason=reason,
            usage=req.usage(),
            first_token_time=req.first_token_time,
            logprobs=req.pending_logprobs,
            stop_sequence=req.text.matched if reason == "stop" else None,
        )

    def fail_all(self, exc: Exception) -> None:
        """After a failed step, whose cause no single request is known to be: every request in the
        batch ends with an error (`take_rejected`), and a fresh batch loop starts. Requests still
        waiting for admission were not part of it: they stay, and run next."""
        error = RequestFailedError(f"the engine step this request was part of failed: {type(exc).__name__}: {exc}")
        self.cache.recover()  # K/V written in that step may be half-done: only those blocks leave the cache
        for req in [r for r in self.requests.values() if r.running]:
            req.running = False
            self._reject(req, error)
        self.gen.close()
        self.gen = self._make_loop()
        mx.clear_cache()

    # --- introspection -----------------------------------------------------------------

    def stats(self) -> dict:
        running = sum(1 for r in self.requests.values() if r.first_token_time is not None)
        compiled = self.gen.compiled
        return {
            "running": running,
            "waiting": len(self.requests) - running,
            "kv_cache_bytes": self.gen.nbytes,
            "batch_peak": self.gen.peak_batch,
            "compiled_steps": compiled.steps if compiled else 0,
            "compiled_shapes": len(compiled.shapes) if compiled else 0,  # traces made (rows x capacity)
            **self.counters,
            **({"speculative": spec.stats()} if (spec := getattr(self.gen, "spec", None)) is not None else {}),
            **({"adapters": self.adapters.stats()} if self.adapters is not None else {}),
        }
