"""Shared fixtures. tests/openblas_plugin.py gives the test process OpenBLAS (the CPU fast path)."""

from __future__ import annotations

import pytest

SMOLLM = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


def pytest_collection_modifyitems(session, config, items):
    """The end-to-end tests first (their worker then starts with them: see below), then the other
    modules with a `slow` test (a server of their own: minutes, not seconds), then the rest; each
    group keeps its order. The long modules start early, so the short ones fill the end of the run
    on whichever worker is free, rather than one worker running a long module alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path.parent.name != "e2e", item.path not in slow))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (`-n 2`, pyproject addopts) hands out whole work units: every end-to-end test
    in one, run by one worker in order (they share port 8000 and a local Ray, and reuse shared
    servers: tests/e2e/conftest.py orders them), and each other module whole, so that its
    module-scoped engines load once. The end-to-end unit goes out first: it is the longest, and
    mostly waits on its `serve run`, while the other worker computes."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/e2e" if path.startswith("tests/e2e/") else path

    config.option.loadscopereorder = False  # collection order: the end-to-end unit first
    return ByModule(config, log)


@pytest.fixture(scope="session")
def smollm():
    from engine.loading.loader import load_model

    return load_model(SMOLLM)


@pytest.fixture(scope="session")
def _engine_loads():
    """The session's engine loads: `load_model` loading each (source, options) once."""
    from engine.loading.loader import load_model, memoized

    return memoized(load_model)


@pytest.fixture(scope="module")
def load_once(_engine_loads):
    """Engines built in this module load each model once in the session (the test process): the
    weights (immutable once loaded) are shared by the engines of every module that asks for this,
    which cuts a load (for Gemma, mostly its 262k-token tokenizer) from every engine after the
    session's first. A module whose engines change their model (LoRA adapters attach layers to
    it) does not ask for it."""
    import engine.engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.engine, "load_model", _engine_loads)
        yield
