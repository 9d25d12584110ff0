"""What a model replica's paged cache really holds, told in the request router's terms.

The prefix-affinity router (deployments.request_router) keys prompts by chained hashes of
fixed-size blocks of their *text*; the engine keys its KV blocks by chained hashes of *token*
blocks. A replica knows both for every prompt it served: it remembers, for the most recent
prompts, the router's text-block hashes next to the engine's token-block hashes. When Ray Serve
asks for its routing stats (`record_routing_stats`, every `affinity.report_period_s`), it asks
its engine how many leading token blocks of each remembered prompt are still in the cache, and
reports the text blocks those cover. Ray delivers the report to every handle's router, which
takes it as the truth for that replica: prefixes the cache evicted stop attracting requests, and
prefixes that other routers sent there start to.

A text block counts as held when the tokens still cached cover at least its share of the prompt
(text and tokens of one prompt grow together; the chat template's few extra tokens make this
slightly conservative). A prompt whose request is still queued or running counts as held whole:
its blocks are being computed here, and requests that share them wait for them. Hashes only: no
prompt text is kept or logged.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from typing import Any

from .hop import GenerateRequest
from .prefix_hashing import block_hashes, prompt_text


class PrefixResidency:
    """The recent prompts of one replica, and the report of which of their blocks it holds."""

    def __init__(self, block_chars: int, max_prompts: int = 256, max_hashes: int = 8192):
        self.block_chars = block_chars
        self.max_prompts = max_prompts
        self.max_hashes = max_hashes
        # last text hash of a prompt -> (its text-block hashes, its text length, its token blocks,
        # its token count); least recently served first
        self._prompts: OrderedDict[int, tuple[list[int], int, list[bytes], int]] = OrderedDict()
        self._active: Counter[int] = Counter()  # prompts of requests not finished yet
        self.block_size = 0

    def served(
        self, request: GenerateRequest, prompt_ids: list[int], token_blocks: list[bytes], block_size: int
    ) -> int | None:
        """Remember one request's prompt (as the router hashed it) and its token blocks; returns the
        key to pass to `finished` when the request ends."""
        text = prompt_text(request)
        hashes = block_hashes(text, self.block_chars) if text else []
        if not hashes or not token_blocks:
            return None
        self.block_size = block_size
        key = hashes[-1]
        self._prompts[key] = (hashes, len(text), token_blocks, len(prompt_ids))
        self._prompts.move_to_end(key)
        self._active[key] += 1
        while len(self._prompts) > self.max_prompts:
            self._prompts.popitem(last=False)
        return key

    def finished(self, key: int | None) -> None:
        if key is not None and self._active[key] > 0:
            self._active[key] -= 1
            if not self._active[key]:
                del self._active[key]

    def held_text_blocks(self, n_text: int, text_len: int, resident_blocks: int, prompt_tokens: int) -> int:
        """Leading text blocks covered by `resident_blocks` cached token blocks of the prompt."""
        if prompt_tokens <= 0 or resident_blocks <= 0:
            return 0
        covered = min(1.0, resident_blocks * self.block_size / prompt_tokens)
        return min(n_text, int(covered * text_len) // self.block_chars)

    async def report(self, engine, timeout_s: float = 2.0) -> dict[str, Any]:
        """{"at", "block_chars", "hashes"}: the text-block hashes this replica's cache holds, the
        most recently served prompts' first, at most max_hashes."""
        keys = list(reversed(self._prompts))
        prompts = [self._prompts[k] for k in keys]
        at = time.time()
        resident = (
            await asyncio.wait_for(asyncio.wrap_future(engine.resident_blocks([p[2] for p in prompts])), timeout_s)
            if prompts
            else []
        )
        seen: set[int] = set()
        out: list[int] = []
        for key, (hashes, text_len, _, tokens), blocks in zip(keys, prompts, resident):
            held = len(hashes) if key in self._active else self.held_text_blocks(len(hashes), text_len, blocks, tokens)
            for h in hashes[:held]:
                if h not in seen:
                    seen.add(h)
                    out.append(h)
            if len(out) >= self.max_hashes:
                break
        return {"at": at, "block_chars": self.block_chars, "hashes": out[: self.max_hashes]}
