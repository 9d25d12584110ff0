"""Fixtures of the end-to-end tests (real `serve run`, real HTTP)."""

from __future__ import annotations

import pytest

from .serving import SharedServer


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """The shared `serve run serve_config.yaml` (tests/e2e/serving.SharedServer); a module asks
    it for a running server with `default_server.get()`."""
    shared = SharedServer(tmp_path_factory)
    yield shared
    shared.stop()
