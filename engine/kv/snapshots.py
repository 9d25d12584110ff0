"""Snapshots of recurrent state, indexed by the prefix cache's blocks.

A hybrid model's K/V blocks alone cannot resume a prompt: its recurrent layers need their state
after exactly the reused tokens. So the cache also keeps *snapshots*: one sequence's whole
recurrent state after `n` tokens, stored on the indexed block that holds token `n - 1`, with
`m = n - k * block_size` (1..block_size) the tokens of that block it covers. A block's chained
hash names every token before it and its own tokens are compared on every hit, so a snapshot on
(block, m) is valid for any prompt whose match covers the block's first `m` tokens — whoever
wrote it, prompt or output.

Where snapshots are taken (engine.kv.manager): at the end of each prompt's prefill (all but its
last token: a repeated prompt is a HIT) unless the sequence resumed from a snapshot only a few
tokens before (`min_gap`: a state weighs as much as the K/V of many tokens), every
`state_interval` tokens of a prompt, where a prompt's match with cached K/V ended (a shared system
prompt followed by different questions: the second question leaves a state where they part, the
third resumes there), and when a request ends or is preempted (the conversation so far: the next
turn resumes there).

Memory: a snapshot is as large as a sequence's state (often many K/V blocks' worth), so snapshots
have their own share of the model's KV budget, least recently used first out. A snapshot goes
with its block when the pool evicts the block; a block stays when its snapshot goes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class Snapshot:
    arrays: list[mx.array]  # one per state array of the model, batch dim 1
    nbytes: int


class SnapshotStore:
    def __init__(self, budget_bytes: int, block_size: int):
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self.on_block: dict[int, dict[int, Snapshot]] = {}  # block -> m -> snapshot
        self.lru: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.bytes = 0
        self.counters = {"snapshots_taken": 0, "snapshots_evicted": 0, "state_resumes": 0, "snapshots_skipped": 0}

    def add(self, block: int, m: int, arrays: list[mx.array], nbytes: int) -> None:
        """Keep a snapshot of the state after token `m - 1` of `block` (replacing one already there)."""
        if nbytes > self.budget_bytes:
            self.counters["snapshots_skipped"] += 1
            return
        self.drop(block, m)
        while self.bytes + nbytes > self.budget_bytes and self.lru:
            self.drop(*next(iter(self.lru)))
            self.counters["snapshots_evicted"] += 1
        self.on_block.setdefault(block, {})[m] = Snapshot(arrays, nbytes)
        self.lru[block, m] = None
        self.bytes += nbytes
        self.counters["snapshots_taken"] += 1

    def drop(self, block: int, m: int) -> None:
        held = self.on_block.get(block)
        if held is None or m not in held:
            return
        self.bytes -= held.pop(m).nbytes
        del self.lru[block, m]
        if not held:
            del self.on_block[block]

    def forget_block(self, block: int) -> None:
        """The prefix index let `block` go: its snapshots go too."""
        for m in list(self.on_block.get(block, ())):
            self.drop(block, m)

    def best(
        self, blocks: list[int], partial_block: int | None, partial_tokens: int, limit: int
    ) -> tuple[int, int, int]:
        """The longest resume point of a match: (tokens n, block, m) with n <= limit, or (0, -1, 0).
        `blocks`: the matched full blocks in order; `partial_block`'s first `partial_tokens`
        tokens continue the match."""
        bs = self.block_size
        if partial_block is not None:
            for m in sorted(self.on_block.get(partial_block, ()), reverse=True):
                n = len(blocks) * bs + m
                if m <= partial_tokens and n <= limit:
                    return n, partial_block, m
        for k in range(len(blocks) - 1, -1, -1):
            for m in sorted(self.on_block.get(blocks[k], ()), reverse=True):
                n = k * bs + m
                if n <= limit:
                    return n, blocks[k], m
        return 0, -1, 0

    def take(self, block: int, m: int) -> list[mx.array]:
        """A snapshot's arrays for a resuming sequence (shared, never written: MLX arrays are values)."""
        self.lru.move_to_end((block, m))
        self.counters["state_resumes"] += 1
        return list(self.on_block[block][m].arrays)

    def clear(self) -> None:
        self.on_block.clear()
        self.lru.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"snapshots": len(self.lru), "snapshot_bytes": self.bytes, **self.counters}
