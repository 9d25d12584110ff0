"""Shared fixtures. tests/openblas_plugin.py gives the test process OpenBLAS (the CPU fast path)."""

from __future__ import annotations

import pytest

SMOLLM = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


@pytest.fixture(scope="session")
def smollm():
    from engine.loader import load_model

    return load_model(SMOLLM)
