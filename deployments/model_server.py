"""ModelServer: one Ray Serve deployment per model, a thin shell around the engine's AsyncEngine.

The router calls `generate` through a streaming handle with a `GenerateRequest`; each item that
comes back is a `Chunk` of output or, last, an `ErrorItem` (deployments.hop).

A hop costs several ms, so output is coalesced: the first token goes at once, then whatever the
engine produced is sent at most once per window, the windows of every stream ending together (so
that one event-loop wake-up sends them all); the last chunk goes as soon as it exists. The window
is `stream_window_ms`, widened when many streams are active so that the replica sends at most
`stream_max_chunks_per_s` chunks in all. Closing the stream (the router cancels it when its
client disconnects) aborts the request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, OrchardError
from engine.request import PromptInput

from . import hop_trace
from .gather import serve_gathered
from .governed import GovernedReplica
from .hop import Chunk, ErrorItem, GenerateRequest, error_item, failure_item
from .prefix_residency import PrefixResidency

log = logging.getLogger("ray.serve")
REPORT_MIN_INTERVAL_S = 1.0  # prefix reports (record_routing_stats) are reused this long
REPORT_TIMEOUT_S = 5.0  # the engine answers between two steps; a prefill step can take seconds on a CPU


async def coalesced(stream, window_s: Callable[[], float]) -> AsyncIterator:
    """`stream`'s outputs, merged: the first at once, then at most one per window (`window_s()`,
    read again for every output), the last as soon as it exists. The engine's RequestStream holds
    and merges what comes in between, and wakes this reader once per window, not once per step."""
    not_before = 0.0
    while not stream.finished:
        try:
            out = await stream.next_output(not_before)
        except StopAsyncIteration:
            return
        not_before = window_end(time.monotonic(), window_s())
        yield out


def window_end(now: float, window: float) -> float:
    """The end of the window after `now` on one grid for every stream of the process, half a window
    to one and a half away: the streams' windows end together, so their readers' timers
    (engine.streams) fire in one event-loop wake-up instead of a few readers at every step."""
    return (math.floor(now / window + 0.5) + 1) * window


def chunk_of(output, stream) -> Chunk:
    """One RequestOutput delta of `stream` as a hop chunk."""
    chunk: Chunk = {
        "text": output.text,
        "n_tokens": len(output.token_ids),
        "finish_reason": output.finish_reason,
        "usage": output.usage.to_openai() if output.usage is not None else None,
        "request_id": stream.request_id,
        "prompt_tokens": stream.prompt_tokens,
    }
    if output.logprobs is not None:
        chunk["logprobs"] = list(output.logprobs)
    if output.stop_sequence is not None:
        chunk["stop_sequence"] = output.stop_sequence
    return chunk


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=10, health_check_timeout_s=30)
class ModelServer(GovernedReplica):
    """Hosts one model. Constructed by the app builder with validated ModelConfig fields."""

    def __init__(
        self,
        name: str,
        source: str,
        engine: dict,
        default_sampling: dict | None = None,
        stream_window_ms: float = 30.0,
        stream_max_chunks_per_s: float = 100.0,
        memory_share_bytes: int | None = None,
        allow_ignore_eos: bool = False,
        prefix_block_chars: int | None = None,
    ):
        from engine.engine import AsyncEngine  # MLX loads in the replica, not in the builder
        from engine.memory import mib
        from engine.threads import share_gil_with_engine

        started = time.monotonic()
        gil_switch_s = share_gil_with_engine()
        self.name = name
        self.default_sampling = dict(default_sampling or {})
        self.allow_ignore_eos = allow_ignore_eos
        self.window_s = stream_window_ms / 1000.0
        self.max_chunks_per_s = stream_max_chunks_per_s
        self._init_governed()
        self.served = 0  # generate calls taken (record_routing_stats)
        self._gathered: dict[str, dict[int, asyncio.Task]] = {}  # generate_many's calls: each request's task
        # prefix-affinity routing: what this replica's cache holds, reported to the routers
        self.residency = PrefixResidency(prefix_block_chars) if prefix_block_chars else None
        self._report: dict[str, Any] | None = None
        self._report_made = 0.0
        self._refresh: asyncio.Task | None = None
        self.engine = AsyncEngine.from_source(source, EngineConfig.model_validate(engine))
        self._trace = hop_trace.open_trace("replica")  # per-hop timestamps (ORCHARD_HOP_TRACE), else None
        if self._trace is not None:
            self.engine.step_log = collections.deque(maxlen=100_000)
        self._loaded(started, memory_share_bytes)
        self.loaded_info["gil_switch_interval_s"] = gil_switch_s
        footprint = self.engine.footprint
        log.info(
            "model %s ready in %.1fs: %s; footprint %s (weights %s, KV %s, working %s)",
            name,
            self.loaded_info["cold_start_s"],
            self.engine.info,
            mib(footprint.total),
            mib(footprint.weights),
            mib(footprint.kv),
            mib(footprint.working),
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk | ErrorItem]:
        """Stream one request's output, coalesced; an error is the last item."""
        from engine.sampling import SamplingParams, with_defaults

        arrived = time.time()
        try:
            params = SamplingParams.parse(with_defaults(self.default_sampling, request.sampling))
            if params.ignore_eos and not self.allow_ignore_eos:
                raise InvalidRequestError(
                    f"ignore_eos is not allowed for model {self.name!r} (its operator can "
                    "set allow_ignore_eos in the model's config)",
                    param="ignore_eos",
                )
            constraint = await asyncio.to_thread(self.engine.compile_guided, params) if params.guided else None
            # an image prompt's processor reads every image: off the event loop, like a grammar
            prepared = (
                await asyncio.to_thread(self.engine.prepare_prompt, request.prompt) if request.prompt.images else None
            )
            stream = self.engine.submit(
                request.prompt, params, request.request_id, constraint, prepared, adapter=request.adapter
            )
            submitted = time.time()
        except OrchardError as exc:
            yield error_item(exc)
            return
        outputs = coalesced(stream, self._stream_window)
        self.active += 1
        self.served += 1
        prompt_key = None
        try:
            if self.residency is not None:
                prompt_key = self.residency.served(
                    request,
                    stream.prompt_ids,
                    self.engine.block_hashes(stream.prompt_ids),
                    self.engine.config.block_size,
                )
            first = True
            async for out in outputs:
                item = chunk_of(out, stream)
                if first:
                    item["format"], first = stream.format.as_dict(), False
                    if self._trace is not None:
                        self._trace_first(request.trace_key, (arrived, submitted), stream, out)
                yield item
        except OrchardError as exc:
            yield error_item(exc)
        finally:
            self.active -= 1
            self.last_active = time.monotonic()
            if self.residency is not None:
                self.residency.finished(prompt_key)
            await outputs.aclose()
            await stream.aclose()  # aborts the request if it is still running (the client left)
            if self._trace is not None:  # a burst's last steps are written with its last request
                hop_trace.write_steps(self._trace, self.engine)

    def _trace_first(self, key: str | None, times: tuple[float, float], stream, output) -> None:
        """The request's hop timestamps (deployments.hop_trace), and the engine's step log so far."""
        self._trace.write(
            {
                "id": key or hop_trace.request_key(),
                "replica_in": times[0],
                "submitted": times[1],
                "admitted": stream.admitted_at,
                "admit_step": stream.admitted_step,
                "first_token": hop_trace.wall(output.first_token_time),
                "first_yield": time.time(),
            }
        )
        hop_trace.write_steps(self._trace, self.engine)

    async def generate_many(self, call_id: str, requests: list[GenerateRequest]) -> AsyncIterator[list]:
        """Several requests in one call (deployments.gather), each run as `generate` runs it: `[]`
        first, then lists of `(index, item)`."""
        running = self._gathered[call_id] = {}
        try:
            async for items in serve_gathered(
                self.generate, requests, running, lambda exc: failure_item(self.name, exc)
            ):
                yield items
        finally:
            self._gathered.pop(call_id, None)

    async def cancel_gathered(self, call_id: str, indices: list[int]) -> None:
        """End these requests of a `generate_many` call (their clients left); the others go on."""
        running = self._gathered.get(call_id, {})
        for i in indices:
            task = running.get(i)
            if task is not None:
                task.cancel()

    def _stream_window(self) -> float:
        """Seconds between two chunks of one stream: the configured window, widened when many streams
        are active so that the replica sends at most max_chunks_per_s chunks in all."""
        return max(self.window_s, self.active / self.max_chunks_per_s)

    def count_tokens(self, prompt: PromptInput) -> dict[str, Any]:
        """{"input_tokens": n}: a prompt as `generate` would encode it, without generating
        (Anthropic's count_tokens); or an error item, as `generate` yields."""
        try:
            ids = self.engine.encode(prompt)
        except OrchardError as exc:
            return error_item(exc)
        return {"input_tokens": len(ids)}

    def adapter_states(self) -> dict[str, dict[str, Any]]:
        """The engine's LoRA adapters by name, each with its state (loaded, unloaded, loading, failed)."""
        return self.engine.adapter_states()

    async def load_adapter(self, name: str) -> dict[str, Any]:
        """Make one adapter resident (an operator's load): its state once loaded, or an error item
        (unknown, malformed) as `generate` yields. The engine reads it on a loader thread and puts
        it in its slot between two steps; this waits in a thread."""
        try:
            await asyncio.to_thread(self.engine.load_adapter, name)
        except OrchardError as exc:
            return error_item(exc)
        return self.engine.adapter_states()[name]

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        """Evict one adapter from the engine's slots (the base stays): its state, or an error item
        (unknown, or busy with requests). The engine does it between two steps."""
        try:
            await asyncio.to_thread(self.engine.unload_adapter, name)
        except OrchardError as exc:
            return error_item(exc)
        return self.engine.adapter_states()[name]

    def info(self) -> dict[str, Any]:
        return {"name": self.name, **self.engine.info, **self.loaded_info}

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), "name": self.name, "replica": self.loaded_info}

    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve's per-replica routing stats (RunningReplica.routing_stats in a request router,
        ReplicaActor.record_routing_stats for an operator and the router's status reads): where this
        replica runs, what it served, its engine stats (`engine`, what `stats` returns), and with
        prefix-affinity routing, the prompt prefixes its cache holds (`prefixes`)."""
        if self.engine is None:  # stopping: nothing to report
            return {}
        engine = self.stats()
        cache = engine.get("cache") or {}
        stats = {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "served": self.served,
            "active": self.active,
            "cache": {k: v for k, v in cache.items() if isinstance(v, (int, float))},
            "engine": engine,  # the router's status reads (deployments.replica_status)
        }
        if self.residency is not None and (report := self._prefix_report()) is not None:
            stats["prefixes"] = report
        return stats

    def _prefix_report(self) -> dict[str, Any] | None:
        """The latest residency report, at once (None before the first): a stale one (older than
        a second) is remade in the background, so that whoever asks (Ray's controller every
        report_period_s, operators and benchmarks in between) never waits for the engine, which
        answers only between two steps (a prefill step can take seconds on a CPU)."""
        stale = self._report is None or time.monotonic() - self._report_made >= REPORT_MIN_INTERVAL_S
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(self._remake_report())
        return self._report

    async def _remake_report(self) -> None:
        try:
            self._report = await self.residency.report(self.engine, timeout_s=REPORT_TIMEOUT_S)
            self._report_made = time.monotonic()
        except (TimeoutError, RuntimeError) as exc:  # busy, or stopping: the routers keep what they know
            log.debug("model %s: no prefix report this time (%s)", self.name, type(exc).__name__)

    def check_health(self) -> None:
        """Ray Serve's health hook: raising marks the replica unhealthy and Serve replaces it. A
        replica whose engine was shut down is stopping (an unload, keep_alive): not unhealthy."""
        if self.engine is not None:
            self.engine.check_health()

    def shutdown_engine(self) -> None:
        """Stop the engine (running requests end, the disk KV cache's queue is written)."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            engine.shutdown()
            disk = (engine.stats().get("cache") or {}).get("disk") or {}
            if disk.get("enabled"):
                log.info(
                    "model %s: engine stopped; disk KV cache flushed: %d blocks on disk, %d written, %d unwritten",
                    self.name,
                    disk["entries"],
                    disk["writes"],
                    disk["queued"],
                )

    def __del__(self):
        """Ray Serve calls this when the replica stops (after in-flight requests drained)."""
        self.shutdown_engine()
