"""Fixtures the engine's test modules share."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.engine import AsyncEngine

from ..conftest import SMOLLM


@pytest.fixture(scope="module", params=["batch_loop", "mlx_lm"])
def engine(request, load_once):
    """Both batch loops: ours (over the paged cache) and mlx_lm's BatchGenerator (cache off)."""
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(paged_cache=request.param == "batch_loop", cache_memory_mb=64))
    yield eng
    eng.shutdown()
