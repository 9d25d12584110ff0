"""AsyncEngine: one model, one loop thread, an asyncio API.

All MLX work (loading included) happens on the engine's own thread. Callers on any asyncio loop
submit requests and read their outputs from an async iterator; the thread hands outputs back
with `loop.call_soon_threadsafe`.

    engine = AsyncEngine.from_source("smollm2-135m-instruct", EngineConfig())
    stream = engine.submit(PromptInput(messages=[{"role": "user", "content": "Hi"}]), SamplingParams())
    async for out in stream:
        print(out.text, end="")
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import queue
import threading
import time
import uuid

from .adapters import Adapters
from .arrivals import ArrivalGather
from .batch_check import BatchCheck, check_batching, files_digest
from .chat_format import (
    REASONING_TAGS,
    OutputFormat,
    check_template_kwargs,
    detect_reasoning_format,
    detect_tool_format,
    merged_template_kwargs,
    prompt_opens_reasoning,
    template_source,
    template_variables,
    thinking_variables,
)
from .config import EngineConfig
from .constraints import Constraint
from .cpu_threads import BlasThreads
from .draft_model import load_drafter
from .errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelLoadError,
    OrchardError,
    OverloadedError,
    UnknownAdapterError,
)
from .kv.interface import CacheManager
from .kv.manager import make_cache_manager
from .loading.loader import LoadedModel, default_cache_dir, load_model
from .memory import Footprint, measure_working_bytes
from .prompts import encode_prompt, render_chat
from .request import PromptInput, Request, RequestOutput
from .sampling import SamplingParams
from .scheduler import Scheduler
from .streams import RequestStream, post, wake_all
from .text_stream import TextStream
from .thinking import ThinkingCap
from .threads import wait_until_gone
from .vision import Vision, load_vision
from .vision.encoder import image_parts
from .vision.prompt import VisionPrompt

log = logging.getLogger(__name__)
_STOP = object()
PROMPT_TAIL_TOKENS = 8  # a prompt's last tokens, read for an opened reasoning block
STATS_INTERVAL_S = 0.25  # the loop publishes a stats snapshot this often (other threads read it)
DISK_FLUSH_S = 5.0  # at shutdown, the disk KV cache's queued blocks are written for this long at most


class AsyncEngine:
    def __init__(self, source: str, config: EngineConfig | None = None):
        """Start the loop thread, which loads the model; blocks until it is ready."""
        self.config = config or EngineConfig()
        self.source = source
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._arrivals = ArrivalGather()  # how long the idle loop gathers a burst (engine.arrivals)
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._dead: BaseException | None = None
        self.loaded: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self.footprint: Footprint | None = None  # weights (adapters' slots included), KV budget, working memory
        self.adapters: Adapters | None = None  # LoRA adapters (engine.adapters), when the config names some
        self.vision = Vision()
        self.batching = BatchCheck("skipped", "not loaded")
        self._stats: dict = {}
        self._stats_at = 0.0
        self._step_started: float | None = None
        self.steps = 0  # engine steps run
        # when a deque: per step (time.time() at its start, seconds, requests in the engine, outputs,
        # compiled-decode traces made so far); readers popleft (deployments.hop_trace)
        self.step_log: collections.deque | None = None
        self._blas: BlasThreads | None = None
        self._thread = threading.Thread(target=self._thread_main, name=f"orchard-engine-{source}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        try:
            check_template_kwargs(self.config.chat_template_kwargs, self.template_reads, "chat_template_kwargs")
        except InvalidRequestError as exc:
            self.shutdown()
            raise ModelLoadError(f"{source}: engine.{exc.message}", param=exc.param) from None

    @classmethod
    def from_source(cls, source: str, config: EngineConfig | None = None) -> AsyncEngine:
        return cls(source, config)

    # --- public API (any thread / event loop) ---------------------------------------------

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        return self.config.context_length or self.loaded.context_length

    @property
    def info(self) -> dict:
        return {**self.loaded.summary(), "context_length": self.context_length}

    def encode(self, prompt: PromptInput) -> list[int]:
        """A prompt's token ids as a request gets them: the chat template (the config's, else the
        model's), tools rendered in it, each image as its run of image tokens. Raises InvalidRequestError."""
        return self.prepare_prompt(prompt)[0]

    def prepare_prompt(self, prompt: PromptInput) -> tuple[list[int], VisionPrompt | None]:
        """A prompt's token ids, and where its images are (None without images): what `submit`
        does first, which for an image prompt (the processor reads every image) can take tens of
        ms, so a caller on an event loop may run it in a thread and hand the result to `submit`.
        Raises InvalidRequestError for a prompt the model cannot take."""
        self.vision.check(self.source, prompt.images, image_parts(prompt.messages))
        if prompt.images:
            return self._encode_images(prompt)
        kwargs = self.template_kwargs(prompt) if prompt.messages is not None else None
        config = self.config
        ids = encode_prompt(
            self.tokenizer, prompt, config.chat_template, config.tool_prompt, kwargs, self.model_format.tools
        )
        return ids, None

    @functools.cached_property
    def template(self) -> str:
        """The chat template's text (the config's, else the model's; "" for a model without one)."""
        return template_source(self.config.chat_template or getattr(self.tokenizer, "chat_template", None))

    @functools.cached_property
    def template_reads(self) -> frozenset[str]:
        """The variables the chat template reads (where chat_template_kwargs may go)."""
        return template_variables(self.template)

    def template_kwargs(self, prompt: PromptInput) -> dict:
        """A chat prompt's template variables: the model's defaults (EngineConfig), what its
        reasoning_effort or thinking maps to, its own chat_template_kwargs. Raises
        InvalidRequestError naming a field the template cannot honour."""
        own = prompt.chat_template_kwargs or {}
        check_template_kwargs(own, self.template_reads, "chat_template_kwargs")
        reasoning = self.model_format.reasoning
        mapped = thinking_variables(self.template_reads, reasoning, prompt.reasoning_effort, prompt.thinking)
        source = "reasoning_effort" if prompt.reasoning_effort is not None else "thinking"
        return merged_template_kwargs(self.config.chat_template_kwargs, own, mapped, source)

    @functools.cached_property
    def model_format(self) -> OutputFormat:
        """The model's tool-call and reasoning formats: the config's, else read from its chat template."""
        template = self.template
        reasoning = self.config.reasoning_format or detect_reasoning_format(template)
        return OutputFormat(
            tools=self.config.tool_format or detect_tool_format(template),
            reasoning=None if reasoning == "none" else reasoning,
        )

    def output_format(self, prompt_ids: list[int], guided: bool = False) -> OutputFormat:
        """A request's output format: the model's, and whether its prompt opened a reasoning block.
        A `guided` request's output is what its grammar forces from the first token on (a call, a
        JSON value): the answer, never reasoning, even after a prompt that opened the block."""
        fmt = self.model_format
        if fmt.reasoning is None or guided:
            return fmt
        tail = self.tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:])
        return dataclasses.replace(fmt, in_reasoning=prompt_opens_reasoning(tail, fmt.reasoning))

    def compile_guided(self, params: SamplingParams) -> Constraint | None:
        """The matcher of a request's `guided` spec (a bad schema is an InvalidRequestError). Can
        take a while for a big schema, so callers on an event loop run it in a thread."""
        if params.guided is None:
            return None
        return self.scheduler.grammars.compile(params.guided, self.model_format.tools)

    def submit(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        request_id: str | None = None,
        constraint: Constraint | None = None,
        prepared: tuple[list[int], VisionPrompt | None] | None = None,
        adapter: str | None = None,
    ) -> RequestStream:
        """Validate and enqueue a request. Raises InvalidRequestError / OverloadedError at once.
        `constraint`: the request's compiled `guided` spec (compiled here when not given);
        `prepared`: `prepare_prompt(prompt)`'s result (computed here when not given); `adapter`:
        the LoRA adapter to run under (None: the base), UnknownAdapterError when not configured.
        One whose load fails ends its stream with an AdapterLoadError."""
        self.check_health()
        if adapter is not None and adapter not in self.adapter_names():
            raise UnknownAdapterError(
                f"model {adapter!r} is not served here (adapters of {self.source}: "
                f"{', '.join(self.adapter_names()) or 'none'})"
            )
        if params.guided is not None and constraint is None:
            constraint = self.compile_guided(params)
        prompt_ids, vision = prepared if prepared is not None else self.prepare_prompt(prompt)
        max_tokens = self._max_tokens(len(prompt_ids), params)
        with self._lock:
            if len(self._streams) >= self.config.max_num_seqs + self.config.max_waiting:
                raise OverloadedError(f"too many requests waiting for {self.source}; retry later")
            request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            fmt = self.output_format(prompt_ids, guided=constraint is not None)
            stream = RequestStream(self, request_id, prompt_ids, fmt)
            self._streams[request_id] = stream
        text = TextStream(self.tokenizer.detokenizer, params.stop)
        cap = self._thinking_cap(stream.format, params) if constraint is None else None
        request = Request(
            request_id,
            prompt_ids,
            params,
            max_tokens,
            text,
            constraint=constraint,
            cap=cap,
            vision=vision,
            adapter=adapter,
        )
        self._inbox.put(("add", request))
        return stream

    def _encode_images(self, prompt: PromptInput) -> tuple[list[int], VisionPrompt]:
        """A chat prompt with images: its token ids (each image's run of image tokens) and its
        engine.vision.prompt.VisionPrompt. The images are encoded later, on the loop thread."""
        if not self.scheduler.takes_images:
            raise InvalidRequestError(
                f"model {self.source} takes images only on the paged batch loop (paged_cache on)", param="messages"
            )
        config = self.config
        kwargs = self.template_kwargs(prompt)
        text = render_chat(
            self.tokenizer, prompt, config.chat_template, config.tool_prompt, kwargs, self.model_format.tools
        )
        return self.vision.encoder.prepare(text, prompt.images)

    def _thinking_cap(self, fmt: OutputFormat, params: SamplingParams) -> ThinkingCap | None:
        """A request's cap on its reasoning (the lower of the model's and its own), for a model
        whose reasoning block is delimited by tags; None: uncapped."""
        limits = [n for n in (self.config.max_thinking_tokens, params.max_thinking_tokens) if n is not None]
        tags = REASONING_TAGS.get(fmt.reasoning or "")
        if not limits or tags is None:
            return None
        return ThinkingCap(min(limits), tags, self._close_ids(tags[1]), self._decode_one, fmt.in_reasoning)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one engine per process; a handful of tags
    def _close_ids(self, tag: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(tag, add_special_tokens=False))

    def _decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict:
        """The loop thread's latest snapshot (at most STATS_INTERVAL_S old): never read live
        scheduler state from another thread."""
        return {"model": self.source, **self._stats}

    def adapter_names(self) -> list[str]:
        """The configured adapters' names, in config order (failed ones too)."""
        return [a.name for a in self.config.adapters]

    def adapter_states(self) -> dict[str, dict]:
        """Each adapter's {"state": loaded|unloaded|loading|failed, "bytes", "path", "rank",
        "error", "last_used" (time.time() or None), "requests"} (any thread)."""
        return self.adapters.snapshot() if self.adapters is not None else {}

    def load_adapter(self, name: str, timeout: float | None = None) -> None:
        """Load an adapter now (a failed one is tried again). BLOCKS until it is loaded: from an
        event loop, run it in a thread. Raises UnknownAdapterError, AdapterLoadError, or
        AdapterBusyError when every slot holds an adapter in use."""
        self._adapter_command("load", name).result(timeout)

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        """Evict an adapter now. BLOCKS until the loop thread did it (between two steps): from an
        event loop, run it in a thread. Raises AdapterBusyError while requests use it."""
        self._adapter_command("unload", name).result(timeout)

    def _adapter_command(self, op: str, name: str) -> concurrent.futures.Future:
        self.check_health()
        if name not in self.adapter_names():
            raise UnknownAdapterError(f"model {name!r} is not an adapter of {self.source}")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("adapter", (op, name, done)))
        return done

    def clear_cache(self) -> None:
        self._inbox.put(("clear_cache", None))

    def block_hashes(self, prompt_ids: list[int]) -> list[bytes]:
        """The prefix cache's chain hashes of a prompt's full blocks ([] without a paged cache)."""
        return self.scheduler.cache.block_hashes(prompt_ids)

    def resident_blocks(self, chains: list[list[bytes]]) -> concurrent.futures.Future:
        """For each chain of block hashes, how many leading blocks the cache holds now, as the
        loop thread sees it between two steps (a Future of a list of ints)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("resident", (chains, done)))
        return done

    def check_health(self) -> None:
        """Raises when the loop thread died or one step has been running for step_timeout_s (hung)."""
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"engine for {self.source} is not running: {self._dead}")
        started = self._step_started
        if started is not None and time.monotonic() - started > self.config.step_timeout_s:
            raise EngineDeadError(
                f"engine for {self.source} is hung: one step has run for "
                f"{time.monotonic() - started:.0f} s (step_timeout_s {self.config.step_timeout_s:g})"
            )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread: running requests end with an error, the disk KV cache's queued
        blocks are written (DISK_FLUSH_S at most); waits `timeout` s for it."""
        self._inbox.put((_STOP, None))
        self._thread.join(timeout)
        if not self._thread.is_alive():
            wait_until_gone(self._thread.native_id)

    def _max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        room = self.context_length - prompt_len
        if room < 1:
            raise InvalidRequestError(
                f"the prompt is {prompt_len} tokens; this model's context is {self.context_length} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        if params.max_tokens is None:
            return min(self.config.default_max_tokens, room)
        if params.max_tokens > room:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds this model's "
                f"context of {self.context_length} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return params.max_tokens

    # --- the loop thread -----------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self.loaded = load_model(self.source, fast_cpu=self.config.fast_cpu)
            self.vision = load_vision(self.loaded, self.config)
            self._check_batching()
            weights_id = self._weights_id() if self.config.disk_cache.enabled else None
            cache = make_cache_manager(self.loaded.model, self.config, default_cache_dir() / "kv-disk", weights_id)
            solo = self.batching.outcome == "solo"
            encoder = self.vision.encoder
            self.drafter = None if solo else load_drafter(self.config, self.loaded, cache, load_model)
            if self.config.adapters:  # after the batch check and before the footprint's warm-up
                self.adapters = Adapters(self.config.adapters, self.loaded.model, self.config.max_loaded_adapters)
            self.scheduler = Scheduler(
                self.loaded.model,
                self.loaded.tokenizer,
                self.config,
                cache,
                solo=solo,
                vision=encoder,
                drafter=self.drafter,
                adapters=self.adapters,
            )
            self.footprint = self._measure_footprint(cache)
            self._blas = BlasThreads.for_this_process() if self.config.adaptive_cpu_threads else None
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            self._load_error = exc
            self._ready.set()
            return
        self._publish_stats(force=True)
        self._ready.set()
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the loop's death is reported to every caller (check_health)
            log.exception("engine loop for %s died", self.source)
            self._dead = exc
            self._fail_streams(EngineDeadError(f"engine for {self.source} died: {exc}"))
        finally:
            self.scheduler.cache.close(DISK_FLUSH_S)  # what the disk tier has queued is written
            self._publish_stats(force=True)  # the last word (what was written)
            self.scheduler.gen.close()  # its compiled step's traces go on the thread that made them
            if self.adapters is not None:
                self.adapters.close()
            if self._blas is not None:
                self._blas.restore()

    def _weights_id(self) -> str:
        """The weights as loaded, for the disk KV cache's key: the model's files, and whether they
        were dequantized to float32 (the fast CPU path computes other K/V from the same files)."""
        return f"{files_digest(self.loaded.model_path)}|fast_cpu={self.loaded.fast_cpu}"

    def _check_batching(self) -> None:
        """The warm-up batch (engine.batch_check): a model whose batched step is wrong is served
        one request at a time; one that fails even alone is refused."""
        loaded = self.loaded
        cache = default_cache_dir() / "batch-check"
        check = self.batching = check_batching(loaded.model, loaded.tokenizer, self.config, loaded.model_path, cache)
        if check.outcome == "unservable":
            raise ModelLoadError(f"{self.source} cannot be served: {check.detail}")
        if check.outcome in ("failed", "solo"):
            log.error("%s: no batch serves it right (%s): ONE REQUEST AT A TIME", self.source, check.detail)
            self.config = self.config.model_copy(update={"max_num_seqs": 1, "prefill_batch_size": 1})
        else:
            log.info("%s: batch check %s: %s", self.source, check.outcome, check.detail)

    def _measure_footprint(self, cache: CacheManager) -> Footprint:
        """Weights as loaded, the KV cache's budget, and the working memory of a warm-up prefill."""
        cfg = self.config
        working = measure_working_bytes(self.loaded.model, cfg.prefill_batch_size, cfg.prefill_step_size)
        weights, kv = self.loaded.weights_bytes, cache.budget_bytes
        if self.drafter is not None:  # the draft model's weights and KV budget (engine.draft_model)
            weights += self.drafter.weights_bytes
            kv += self.drafter.kv_budget_bytes
        if self.adapters is not None:  # every slot's stacks, allocated at start (engine.adapters)
            weights += self.adapters.table.nbytes
        encoder = self.vision.encoder
        if encoder is not None:  # its tower, one largest image's working memory, its cache, running requests' features
            weights += encoder.weights_bytes
            working += encoder.measure_working_bytes() + encoder.cache_bytes
            working += cfg.max_num_seqs * cfg.max_images * encoder.image_bytes
        return Footprint(weights=weights, kv=kv, working=working, measured=True)

    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            if not self._drain_inbox(block=not sched.has_work()):
                return
            self._publish_stats()
            if not sched.has_work():
                continue
            self._step_started, began = time.monotonic(), time.time()
            try:
                outputs = sched.step()
            except OrchardError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving; the batch's requests end with an error
                log.exception("engine step failed; ending the requests in its batch")
                sched.fail_all(exc)
                outputs = []
            finally:
                self._step_started = None
            self.steps += 1
            if self.step_log is not None:
                self._log_step(began, len(outputs))
            self._deliver(outputs)
            self._fail_rejected()
            if self._blas is not None:
                self._blas.tick()

    def _log_step(self, began: float, outputs: int) -> None:
        """(start, seconds, requests, outputs, compiled-decode traces and calls so far: on CUDA, padded)."""
        compiled = self.scheduler.gen.compiled
        traces, masked = (compiled.traces, compiled.steps) if compiled is not None else (0, 0)
        self.step_log.append(
            (round(began, 6), round(time.time() - began, 6), len(self._streams), outputs, traces, masked)
        )

    def _fail_rejected(self) -> None:
        """End the requests the scheduler could not start, each with its own error."""
        for request_id, exc in self.scheduler.take_rejected():
            with self._lock:
                stream = self._streams.pop(request_id, None)
            if stream is not None:
                error = (
                    exc
                    if isinstance(exc, OrchardError)
                    else InvalidRequestError(f"this request could not be started: {type(exc).__name__}: {exc}")
                )
                log.warning("request %s ended alone: %s", request_id, error)
                post(stream._loop, stream.put, error)

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._stats_at >= STATS_INTERVAL_S:
            self._stats = {
                **self.scheduler.stats(),
                "cache": self.scheduler.cache.stats(),
                "batched": self.config.max_num_seqs > 1,
                **self.batching.stats(),
                "cpu_threads": self._blas.threads if self._blas is not None else None,
                **({"vision": self.vision.encoder.stats()} if self.vision.encoder is not None else {}),
            }
            self._stats_at = now

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds/aborts (then refresh the stats snapshot). False when asked to stop. A
        request that wakes the idle loop starts a gathering of the requests sent with it
        (engine.arrivals)."""
        changed, gathering = False, False
        while True:
            try:
                if not gathering:
                    kind, item = self._inbox.get(block=block, timeout=0.5 if block else None)
                else:  # woken from idle: requests sent together, until a gap (engine.arrivals)
                    gap = self._arrivals.gap(time.monotonic())
                    kind, item = self._inbox.get(block=gap > 0, timeout=gap if gap > 0 else None)
            except queue.Empty:
                if changed:
                    self._publish_stats(force=True)
                return True
            changed, idle, block = True, block, False
            if kind is _STOP:
                self._fail_streams(EngineDeadError(f"engine for {self.source} is shutting down"))
                return False
            if kind == "add":
                now = time.monotonic()
                if idle:  # a request woke the idle loop (not a stats or cache query): gather its burst
                    self._arrivals.wake(now)
                    gathering = True
                self._arrivals.arrived(now)
                stream = self._streams.get(item.request_id)
                if stream is not None:
                    stream.admitted_at, stream.admitted_step = time.time(), self.steps
                    self.scheduler.add(item)
                    self._fail_rejected()
            elif kind == "abort":
                out = self.scheduler.abort(item)
                self._deliver([out] if out is not None else [])
                with self._lock:
                    self._streams.pop(item, None)
            elif kind == "clear_cache":
                self.scheduler.cache.clear()
            elif kind == "adapter":
                self._adapter_op(*item)
            elif kind == "resident":
                chains, done = item
                if done.set_running_or_notify_cancel():  # the asker may have given up (timed out)
                    done.set_result([self.scheduler.cache.resident(c) for c in chains])

    def _adapter_op(self, op: str, name: str, done: concurrent.futures.Future) -> None:
        """An operator's load / unload, on the loop thread between two steps."""
        if not done.set_running_or_notify_cancel():
            return
        if op == "load":
            self.adapters.load(name, done)  # resolved once read and put in its slot
            return
        try:
            self.adapters.unload(name)
        except OrchardError as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Merge a step's outputs into their streams on this thread, and wake only the readers
        that wait for a stream now ready: one thread hop per event loop at most, none while every
        reader waits out its window (engine.streams). When a request finishes, the stats snapshot
        is refreshed first (a caller that saw its last output then reads stats that include it)."""
        if any(out.finished for out in outputs):
            self._publish_stats(force=True)
        with self._lock:
            pairs = [(self._streams.get(out.request_id), out) for out in outputs]
            for out in outputs:
                if out.finished:
                    self._streams.pop(out.request_id, None)
        wake: dict = {}
        for stream, out in pairs:
            if stream is None:
                continue
            if stream._loop.is_closed():  # nobody reads this stream any more
                if not out.finished:
                    self.abort(stream.request_id)
            elif stream.deliver(out):
                wake.setdefault(stream._loop, []).append(stream)
        for loop, streams in wake.items():
            if not post(loop, wake_all, streams):  # the loop closed meanwhile
                log.warning("dropping %d stream(s) whose event loop has closed", len(streams))
                for stream in streams:
                    self.abort(stream.request_id)

    def _fail_streams(self, exc: BaseException) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            post(stream._loop, stream.put, exc)
