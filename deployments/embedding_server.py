"""EmbeddingServer: one Ray Serve deployment per embedding model, a thin shell around the engine's
EmbeddingEngine (`kind: embedding` in the YAML).

The router calls `embed` through a handle with an `EmbedRequest` and gets back `Embeddings` or an
`ErrorItem` (deployments.hop). Concurrent requests are merged by Ray Serve's `@serve.batch`
(`embedding.max_batch_size` requests, waiting at most `batch_wait_timeout_s` for them): their
inputs go through the engine as one call, in a worker thread, so the replica's event loop keeps
taking requests while the model runs. With `max_batch_size: 1` there is no batching: each
request is its own engine call, one at a time on the same thread.

A merged call holds requests alike in what they ask of the engine (truncation, dimensions, text or
token ids); a request whose inputs the engine refuses (too long, bad token ids) fails alone: the
group is then run request by request, and every other request still gets its vectors.

As a chat model's ModelServer, the replica reports its measured footprint, idle seconds, an
operator's unload request and its node to the memory governor (`record_autoscaling_stats`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from ray import serve

from engine.errors import InvalidRequestError, OrchardError
from engine.threads import MlxWorker

from .config import EmbeddingOptions
from .governed import GovernedReplica
from .hop import Embeddings, EmbedRequest, ErrorItem, error_item

log = logging.getLogger("ray.serve")
HUNG_BASE_S = 60.0  # an engine call running longer than this plus HUNG_PER_INPUT_S per input is hung
HUNG_PER_INPUT_S = 1.0


def _key(request: EmbedRequest) -> tuple:
    """What a merged engine call must share: its options, and text or token-id inputs."""
    text = bool(request.inputs) and isinstance(request.inputs[0], str)
    return request.truncate, request.dimensions, text


def embed_one(engine, request: EmbedRequest) -> Embeddings | ErrorItem:
    """One request as its own engine call; the engine's refusal as an error item."""
    try:
        result = engine.embed(list(request.inputs), truncate=request.truncate, dimensions=request.dimensions)
    except OrchardError as exc:
        return error_item(exc)
    return {"vectors": result.vectors, "prompt_tokens": result.prompt_tokens}


def embed_together(engine, requests: Sequence[EmbedRequest]) -> list[Embeddings | ErrorItem]:
    """Each request's answer, in order, from as few engine calls as their options allow: one per
    group of alike requests, or one per request of a group the engine refused (so that the refusal
    names the right input and reaches only its own request)."""
    answers: list[Embeddings | ErrorItem | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(_key(request), []).append(i)
    for members in groups.values():
        if len(members) > 1:
            merged = _embed_group(engine, [requests[i] for i in members])
            if merged is not None:
                for i, answer in zip(members, merged, strict=True):
                    answers[i] = answer
                continue
        for i in members:
            answers[i] = embed_one(engine, requests[i])
    return answers


def _embed_group(engine, group: list[EmbedRequest]) -> list[Embeddings] | None:
    """Alike requests as one engine call, split back per request; None when the engine refused an input."""
    first = group[0]
    inputs = [x for r in group for x in r.inputs]
    try:
        result = engine.embed(inputs, truncate=first.truncate, dimensions=first.dimensions)
    except InvalidRequestError:
        return None
    out, start = [], 0
    for r in group:
        end = start + len(r.inputs)
        out.append({"vectors": result.vectors[start:end], "prompt_tokens": sum(result.input_tokens[start:end])})
        start = end
    return out


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=10, health_check_timeout_s=30)
class EmbeddingServer(GovernedReplica):
    """Hosts one embedding model. Constructed by the app builder with validated ModelConfig fields."""

    def __init__(self, name: str, source: str, embedding: dict, memory_share_bytes: int | None = None):
        from engine.embed.engine import EmbeddingEngine  # MLX loads in the replica, not in the builder
        from engine.memory import mib

        started = time.monotonic()
        self.name = name
        self.options = EmbeddingOptions.model_validate(embedding)
        self._init_governed()
        self.counts = {"requests": 0, "inputs": 0, "batches": 0}  # batches: merged sets of requests computed
        self._busy_since: float | None = None
        self._busy_inputs = 0
        self._thread = MlxWorker(f"embed-{name}")  # the engine runs one call at a time
        self._embed_batch.set_max_batch_size(self.options.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)
        self.engine = EmbeddingEngine.from_source(source, max_batch_size=self.options.rows_per_pass)
        self._loaded(started, memory_share_bytes)
        footprint = self.engine.footprint
        log.info(
            "embedding model %s ready in %.1fs: %d dims, context %d; footprint %s (weights %s, working %s)",
            name,
            self.loaded_info["cold_start_s"],
            self.engine.info.dimension,
            self.engine.info.context_length,
            mib(footprint.total),
            mib(footprint.weights),
            mib(footprint.working),
        )

    async def embed(self, request: EmbedRequest) -> Embeddings | ErrorItem:
        """One request's vectors (merged with concurrent requests unless max_batch_size is 1)."""
        self.active += 1
        self.counts["requests"] += 1
        self.counts["inputs"] += len(request.inputs)
        try:
            if self.options.max_batch_size > 1:
                return await self._embed_batch(request)
            return (await self._run([request]))[0]
        finally:
            self.active -= 1
            self.last_active = time.monotonic()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # set from the model's options at start
    async def _embed_batch(self, requests: list[EmbedRequest]) -> list[Embeddings | ErrorItem]:
        return await self._run(requests)

    async def _run(self, requests: list[EmbedRequest]) -> list[Embeddings | ErrorItem]:
        """The requests' answers, computed on the engine's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread.executor, self._compute, requests)

    def _compute(self, requests: list[EmbedRequest]) -> list[Embeddings | ErrorItem]:
        self._busy_since, self._busy_inputs = time.monotonic(), sum(len(r.inputs) for r in requests)
        try:
            answers = embed_together(self.engine, requests)
        finally:
            self._busy_since = None
        self.counts["batches"] += 1
        return answers

    def info(self) -> dict[str, Any]:
        info = self.engine.info
        return {
            "name": self.name,
            "kind": "embedding",
            "dimension": info.dimension,
            "context_length": info.context_length,
            **self.loaded_info,
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.engine.stats(),
            "name": self.name,
            "running": self.active,
            "batching": {**self.options.model_dump(), **self.counts},
            "replica": self.loaded_info,
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve's per-replica routing stats: the engine stats, for the router's status reads
        (deployments.replica_status), which must not count as requests."""
        return {"engine": self.stats()} if self.engine is not None else {}

    def check_health(self) -> None:
        """Ray Serve's health hook: a stopped engine, or an engine call that hangs, fails it."""
        if self.engine is None:  # stopping (an unload, keep_alive): not unhealthy
            return
        busy = self._busy_since
        limit = HUNG_BASE_S + HUNG_PER_INPUT_S * self._busy_inputs
        if busy is not None and time.monotonic() - busy > limit:
            raise RuntimeError(f"an embedding call has run for {time.monotonic() - busy:.0f} s (limit {limit:.0f} s)")

    def shutdown_engine(self, wait: bool = True) -> None:
        """Stops the engine's thread (`wait`: after the call it is running, so no MLX work is left
        in flight when the process exits) and drops the engine."""
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.shutdown(wait=wait)
        self.engine = None

    def __del__(self):
        """Ray Serve calls this when the replica stops (after in-flight requests drained)."""
        self.shutdown_engine(wait=False)
