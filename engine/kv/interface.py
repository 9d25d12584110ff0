"""The seam between the engine and a model's KV cache: typed protocols, no implementation.

The scheduler talks to a `CacheManager`, one per model. A waiting request starts when the manager
admits it (`can_admit`), with the blocks of its longest cached prefix (`acquire`); before every
step the scheduler asks whether the running requests' next writes fit the budget
(`can_allocate`: the one place that decision is made) and preempts the newest request while they
do not; a request that ends hands its blocks back (`store` what may serve later prompts, or
`release`).

The batch loop talks to a `BatchKV`, the paged K/V the manager hands it (`batch_kv`; None: the
model keeps mlx_lm's own caches and mlx_lm's BatchGenerator runs it): per-layer caches in
mlx_lm's cache protocol for a batch of rows, the writes to evaluate with a step, and the decode
working copies the compiled step reads and writes. It never sees the block pool.

A new kind of cache state (recurrent state, sliding windows, quantized or offloaded blocks,
salted hashes) is one more implementation behind these protocols, not a branch in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import mlx.core as mx

    from .paged_cache import BatchCaches, SeqBlocks
    from .quantized_storage import KVQuant
    from .working_copy import Geometry, WorkingCopy


@dataclass
class StepWrites:
    """What the next step writes into the running requests' caches."""

    decode: list[SeqBlocks] = field(default_factory=list)  # one token each
    prefill: list[tuple[SeqBlocks, int]] = field(default_factory=list)  # a prompt chunk of n tokens each


@runtime_checkable
class CacheManager(Protocol):
    """What the scheduler and the engine ask of one model's KV cache."""

    budget_bytes: int  # bytes the KV cache may take (the KV part of the model's footprint)

    def can_admit(self, tokens: list[int], max_tokens: int) -> bool:
        """Whether a waiting request over `tokens` may start now (else it waits, first in line)."""

    def acquire(self, tokens: list[int], max_tokens: int) -> tuple[SeqBlocks | None, int]:
        """A starting request's blocks, holding the longest cached prefix of `tokens` (all but the
        last token at most), and how many tokens that prefix is."""

    def can_allocate(self, writes: StepWrites) -> bool:
        """Whether the next step's writes fit the budget; False: a running request must make room."""

    def store(self, token_ids: list[int], blocks: SeqBlocks | None) -> None:
        """A request ended with a result: keep what its blocks hold (the K/V of `token_ids`)."""

    def release(self, blocks: SeqBlocks | None) -> None:
        """A request ended without a result worth keeping (abort, failure): drop its blocks."""

    def clear(self) -> None:
        """Forget every cached prefix (running requests keep their blocks)."""

    def begin_step(self) -> None:
        """A step starts: what the running requests hold now is known good."""

    def recover(self) -> None:
        """A step failed (its requests are released next): drop only what it may have half-written."""

    def block_hashes(self, token_ids: list[int]) -> list[bytes]:
        """Chain hashes of a prompt's full blocks (pure: any thread)."""

    def resident(self, hashes: list[bytes]) -> int:
        """Leading blocks of a chain the cache holds now (the loop thread only)."""

    def stats(self) -> dict:
        """A read-only snapshot (other threads may call it while the engine steps)."""

    def batch_kv(self) -> BatchKV | None:
        """The paged K/V our batch loop runs over; None: mlx_lm's own caches (and its loop)."""

    def close(self, timeout_s: float) -> None:
        """The engine stops (its loop thread): finish what is owed to disk, within `timeout_s`."""


@runtime_checkable
class BatchKV(Protocol):
    """The paged K/V as the batch loop sees it."""

    geometry: Geometry | None  # where the decode batch's tokens sit in its working copies
    recurrent: bool  # rows carry recurrent state (engine.kv.recurrent): prompt chunks are never padded
    grouped_mask: bool  # masks get a group axis for attention that groups queries in 5-D (engine.kv.layout)
    quant: KVQuant | None  # blocks stored quantized (engine.kv.quantized_storage); None: the model's dtype
    pipelined: bool  # the loop's steps overlap: copies made while it runs stall it (the cache recomputes instead)

    def caches(self, rows: list[SeqBlocks], chunk: list[int] | None = None) -> BatchCaches:
        """The model's cache list for a batch of rows, one per cache slot (engine.kv.layout);
        `chunk`: the next call is a prompt chunk with `chunk[i]` real tokens in row i."""

    def chunk_limit(self, row: SeqBlocks) -> int | None:
        """Prompt tokens the row may compute before the cache wants its state (None: any)."""

    def decode_copies(self, caches: BatchCaches) -> list[WorkingCopy] | None:
        """Plan the batch's one-token step; when it goes through working copies, every layer's
        copy (for the compiled step), else None (the model's own call gathers)."""

    def commit_column(
        self, caches: BatchCaches, ks: list[mx.array], vs: list[mx.array], columns: list | None = None
    ) -> None:
        """A compiled decode step wrote this step's column: the copies' new K and V, per layer, and
        with quantized blocks the column's quantized (K, V) parts per layer, written to the blocks."""

    def flush(self, caches: BatchCaches) -> None:
        """Decode tokens held only in working copies go to the rows' blocks (before anything else
        reads those blocks); rows take their recurrent state back from the batch."""

    def truncate(self, seq: SeqBlocks, length: int) -> None:
        """Keep only a row's first `length` tokens of K/V (draft tokens a verify step rejected)."""

    def take_writes(self) -> list[mx.array]:
        """The arrays written since the last call, to evaluate with the step."""

    def nbytes(self, rows: list[SeqBlocks]) -> int:
        """Bytes of the distinct blocks the rows hold."""
