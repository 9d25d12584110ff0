"""Shared fixtures. tests/openblas_plugin.py gives the test process OpenBLAS (the CPU fast path)."""

from __future__ import annotations

import pytest

SMOLLM = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into node ids
def pytest_collection_modifyitems(session, config, items):
    """Groups for pytest-xdist (`--dist loadgroup`, pyproject addopts): every end-to-end test in
    one group, run by one worker in order (they share port 8000 and a local Ray, and reuse shared
    servers: tests/e2e/conftest.py orders them), and each other module whole in a group of its
    own, so that its module-scoped engines load once."""
    for item in items:
        group = "e2e" if item.path.parent.name == "e2e" else str(item.path)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def smollm():
    from engine.loading.loader import load_model

    return load_model(SMOLLM)


@pytest.fixture(scope="module")
def load_once():
    """Engines built in this module load each model once: the weights (immutable once loaded)
    are shared by the module's engines, which cuts a load (for Gemma, mostly its 262k-token
    tokenizer) from every engine after the first."""
    import engine.engine
    from engine.loading.loader import load_model

    loaded: dict = {}

    def once(source, **kwargs):
        key = (source, tuple(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = load_model(source, **kwargs)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.engine, "load_model", once)
        yield
