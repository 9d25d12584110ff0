"""The KV cache seam of the scheduler.

A cache manager hands the scheduler a prompt cache for the part of a prompt it already holds
(`acquire`) and takes back the cache of a finished request (`store`). The scheduler inserts the
rest of the prompt on top; mlx_lm's cache protocol does the attention.
"""

from __future__ import annotations

from .config import EngineConfig


class NoCache:
    """Every prompt is computed from scratch."""

    def acquire(self, prompt_ids: list[int]):
        return None, 0

    def store(self, token_ids: list[int], prompt_cache) -> None:
        return None

    def clear(self) -> None:
        return None

    def stats(self) -> dict:
        return {"enabled": False}


def make_cache_manager(model, config: EngineConfig):
    return NoCache()
