"""The prefix index: which pool blocks hold the K/V of which token runs.

A full block is keyed by a chained hash, `H(parent hash, the block's token ids)`, where the chain
starts from a per-model salt. A block's K/V depends on every token before it, and so does its
hash: the same 32 tokens after two different prefixes are two different keys, never reused for
each other. The token ids are kept too and compared on every hit, so even a hash collision cannot
return wrong K/V.

A lookup walks the prompt's full blocks from the start while they are indexed, then looks among
the children of the last matched block (every indexed block, full or partial, that follows it) for
the one sharing the longest run of tokens with the rest of the prompt: that block is reused
partially (the writer copies it first). A block's children are kept sorted by their tokens, so the
child sharing the longest run is one of the two beside the prompt's place in that order (a binary
search): after a system prompt shared by thousands of cached conversations, an admission compares
two blocks, not every conversation (a scan of them all would hold the engine's thread). So
prompts of any length can hit, and a prompt that differs from a cached one inside a block still
reuses the tokens before the difference.

Blocks a running request is still computing are *pending*: another request with the same prefix
waits for them (`Match.pending`) instead of computing them again.

Two eviction modes. Memory-aware: the pool evicts unreferenced cached blocks LRU when it needs room
and tells the index (`forget`, through the pool's `on_evict`). Entry count (memory_aware False):
every finished request leaves one entry (the cached blocks it used); past `max_entries` the least
recently used entry goes, with its blocks unless another entry or a running request holds them.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .block_pool import BlockPool


@dataclass
class Match:
    blocks: list[int]  # indexed full blocks matching the prompt's first blocks, in order
    hashes: list[bytes]  # chain hashes of all the prompt's full blocks
    partial_block: int | None = None  # a block whose first `partial_tokens` tokens continue the match
    partial_tokens: int = 0
    pending: int = 0  # full blocks after `blocks` that a running request is computing now

    def tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size + self.partial_tokens


class PrefixCache:
    def __init__(self, pool: BlockPool, salt: bytes, max_entries: int | None = None):
        self.pool = pool
        self.bs = pool.block_size
        self.root = hashlib.blake2b(b"mlx-orchard kv blocks v1|" + salt, digest_size=16).digest()
        self.full: dict[bytes, int] = {}  # chain hash -> block
        self.meta: dict[int, tuple[bytes, tuple[int, ...], bytes | None]] = {}  # block -> (parent, tokens, hash)
        # parent hash -> [(tokens, block)], sorted: every indexed block after that parent
        self.children: dict[bytes, list[tuple[tuple[int, ...], int]]] = {}
        self.pending: dict[bytes, object] = {}  # chain hash -> the running sequence computing it
        self.max_entries = max_entries
        self.entries: OrderedDict[int, list[int]] = OrderedDict()  # entry-count mode only
        self._entries_of: dict[int, set[int]] = {}
        self._next_entry = 0
        self.counters = {"queries": 0, "hits": 0, "misses": 0, "prefix_hits": 0, "tokens_reused": 0}

    # --- hashing ---------------------------------------------------------------------------

    def chain(self, token_ids, parent: bytes | None = None, first: int = 0) -> list[bytes]:
        """Chain hashes of the full blocks of `token_ids`, from block `first` (whose parent hash
        is `parent`, the root by default)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        h = self.root if parent is None else parent
        out = []
        for k in range(first, len(ids) // self.bs):
            h = hashlib.blake2b(h + ids[k * self.bs : (k + 1) * self.bs].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def parent_of(self, hashes: list[bytes], k: int) -> bytes:
        return hashes[k - 1] if k else self.root

    # --- lookup ------------------------------------------------------------------------------

    def lookup(self, token_ids: list[int], hashes: list[bytes] | None = None) -> Match:
        bs = self.bs
        hashes = self.chain(token_ids) if hashes is None else hashes
        blocks: list[int] = []
        for k, h in enumerate(hashes):
            b = self.full.get(h)
            if b is None or self.meta[b][1] != tuple(token_ids[k * bs : (k + 1) * bs]):
                break
            blocks.append(b)
        match = Match(blocks, hashes)
        k = len(blocks)
        while k < len(hashes) and hashes[k] in self.pending:
            k += 1
        match.pending = k - len(blocks)
        rest = token_ids[len(blocks) * bs : (len(blocks) + 1) * bs]
        parent = self.parent_of(hashes, len(blocks))
        best = max((_common_prefix(toks, rest) for toks, _ in self._beside(parent, tuple(rest))), default=0)
        if best:  # of the blocks sharing that run, the one `holder` names (where snapshots were attached)
            match.partial_block, match.partial_tokens = self.holder(parent, tuple(rest[:best])), best
        return match

    def holder(self, parent: bytes, tokens: tuple[int, ...]) -> int | None:
        """An indexed block after `parent` whose tokens start with `tokens` (None: none)."""
        kids = self.children.get(parent, ())
        i = bisect.bisect_left(kids, (tokens,))  # those starting with `tokens` sort right here
        if i < len(kids) and kids[i][0][: len(tokens)] == tokens:
            return kids[i][1]
        return None

    def _beside(self, parent: bytes, tokens: tuple[int, ...]) -> list[tuple[tuple[int, ...], int]]:
        """The children of `parent` just before and after `tokens` in sorted order: the one sharing
        the longest run of tokens with it is among them (none for no tokens)."""
        kids = self.children.get(parent)
        if not kids or not tokens:
            return []
        i = bisect.bisect_left(kids, (tokens,))
        return kids[max(0, i - 1) : i + 1]

    def resident(self, hashes: list[bytes]) -> int:
        """How many of a chain's leading full blocks are indexed now (no counters, no LRU touch):
        what a replica reports to the request router as really held."""
        n = 0
        for h in hashes:
            if h not in self.full:
                break
            n += 1
        return n

    def record(self, cached: int, prompt_len: int) -> None:
        """Count one admitted prompt: MISS, HIT (all but the last token reused) or PREFIX_HIT."""
        c = self.counters
        c["queries"] += 1
        c["tokens_reused"] += cached
        if cached == 0:
            c["misses"] += 1
        elif cached >= prompt_len - 1:
            c["hits"] += 1
        else:
            c["prefix_hits"] += 1

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            self.pool.touch(b)
        if self.max_entries is not None and blocks:
            for e in self._entries_of.get(blocks[-1], ()):
                self.entries.move_to_end(e)

    # --- insertion and removal -------------------------------------------------------------

    def insert(self, parent: bytes, tokens: tuple[int, ...], block: int, h: bytes | None = None) -> bool:
        """Index `block` as holding `tokens` after `parent` (a full block with chain hash `h`, or a
        partial one when `h` is None). False when it adds nothing."""
        if block in self.meta or block < BlockPool.RESERVED:
            return False
        if not tokens:
            return False
        if h is not None:
            if h in self.full:
                return False
            self.full[h] = block
        elif self.holder(parent, tokens) is not None:
            return False  # an indexed block already starts with these tokens
        bisect.insort(self.children.setdefault(parent, []), (tokens, block))
        self.meta[block] = (parent, tokens, h)
        self.pool.set_cached(block, True)
        return True

    def forget(self, block: int) -> None:
        """Drop an evicted block from the index (the pool's `on_evict`)."""
        parent, tokens, h = self.meta.pop(block)
        if h is not None:
            self.full.pop(h, None)
        kids = self.children.get(parent, [])
        i = bisect.bisect_left(kids, (tokens, block))
        if i < len(kids) and kids[i] == (tokens, block):
            del kids[i]
            if not kids:
                del self.children[parent]
        for e in self._entries_of.pop(block, ()):
            if e in self.entries:
                self.entries[e].remove(block)

    def clear(self) -> None:
        for b in list(self.meta):
            self.forget(b)
            self.pool.set_cached(b, False)
        self.pending.clear()
        self.entries.clear()
        self._entries_of.clear()

    # --- entry-count mode ------------------------------------------------------------------

    def add_entry(self, blocks: list[int]) -> None:
        """Entry-count mode: one finished request's cached blocks form one entry."""
        blocks = [b for b in blocks if b in self.meta]
        if self.max_entries is None or not blocks:
            return
        e, self._next_entry = self._next_entry, self._next_entry + 1
        self.entries[e] = blocks
        for b in blocks:
            self._entries_of.setdefault(b, set()).add(e)

    def trim_entries(self) -> None:
        """Entry-count mode: drop least recently used entries past max_entries, and every cached
        block that no entry holds and no running request references."""
        if self.max_entries is None:
            return
        while len(self.entries) > self.max_entries:
            e, blocks = self.entries.popitem(last=False)
            for b in blocks:
                self._entries_of.get(b, set()).discard(e)
        for b in list(self.meta):
            if not self._entries_of.get(b) and self.pool.refs[b] == 0:
                self.forget(b)
                self.pool.evict(b)

    # --- numbers -------------------------------------------------------------------------

    def stats(self) -> dict:
        out = dict(self.counters)
        out["indexed_blocks"] = len(self.meta)
        out["pending_blocks"] = len(self.pending)
        if self.max_entries is not None:
            out["entries"] = len(self.entries)
            out["max_entries"] = self.max_entries
        return out


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
