"""The batch loop's interface: what the scheduler drives, whichever loop runs the model.

Three loops implement it: our `BatchLoop` over the paged KV cache (engine.batch_loop),
`MlxLmBatch`, mlx_lm's BatchGenerator for models whose caches the paged cache cannot hold
(engine.mlx_lm_batch), and `SoloLoop`, mlx_lm's generate_step one request at a time for a model
no batch loop serves (engine.solo_loop). The cache manager decides between the first two
(`Scheduler` asks it: a manager that hands out paged K/V, `CacheManager.batch_kv`, gets our loop);
the load-time batch check (engine.batch_check) decides on the third.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .compiled_step import CompiledDecode
    from .kv.interface import StepWrites
    from .request import Request


@dataclass
class Token:
    """One output token of one request; `finish` is "stop" (a stop token) or "length" on the last."""

    request_id: str
    token: int
    finish: str | None = None
    logprob: float | None = None  # when the request asked for logprobs
    top: list[tuple[int, float]] | None = None  # its top_logprobs best (token, logprob), best first


@runtime_checkable
class Loop(Protocol):
    """Continuous batching of requests over one model: `insert`, `step()` for their tokens."""

    compiled: CompiledDecode | None  # the compiled decode step, when the loop has one
    peak_batch: int | None  # most rows decoding at once (None: the loop does not count)

    def insert(self, request: Request, tokens: list[int], cached: int, stop_ids: list[int]) -> None:
        """Start `request` over `tokens` (its prompt, and after a preemption its output so far),
        of which its cache (`request.blocks`) holds the first `cached`."""

    def remove(self, request: Request) -> None:
        """Take a running request out of the batch (its tokens in flight are dropped)."""

    def step(self) -> list[Token]:
        """One decode step of the batch and one prefill chunk; the tokens read back."""

    def next_writes(self) -> StepWrites:
        """The tokens the next step writes into each request's cache (for `CacheManager.can_allocate`)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V the running requests hold."""

    def close(self) -> None:
        """Drop the batch and what it compiled (on the thread that made it)."""
