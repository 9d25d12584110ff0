"""Fixtures of the end-to-end tests (real `serve run`, real HTTP)."""

from __future__ import annotations

import pytest

from .serving import HAPROXY_ENV, ROOT, SharedServer, haproxy_available


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """The shared `serve run serve_config.yaml` (tests/e2e/serving.SharedServer); a module asks
    it for a running server with `default_server.get()`."""
    shared = SharedServer(tmp_path_factory)
    yield shared
    shared.stop()


@pytest.fixture(scope="session")
def agents_server(tmp_path_factory):
    """The shared `serve run tests/fixtures/agents.yaml`: a thinking model, a hybrid one, two
    router replicas and LoRA adapters, made here first (`shared.adapters`: their directory, which
    the served copy of the YAML names in place of ${ADAPTERS}). Behind Ray Serve's HAProxy
    ingress where HAProxy is available (the default server keeps Ray's Python proxy), so every
    module of this group also runs through the ingress the README recommends for many clients."""
    from tests.lora_adapters import make_served_adapters  # MLX: only when these modules run

    root = make_served_adapters(tmp_path_factory.mktemp("adapters"))
    config = root / "agents.yaml"
    config.write_text((ROOT / "tests" / "fixtures" / "agents.yaml").read_text().replace("${ADAPTERS}", str(root)))
    shared = SharedServer(tmp_path_factory, config, HAPROXY_ENV if haproxy_available() else None)
    shared.adapters = root
    yield shared
    shared.stop()


# The modules on each shared server, in the order they run: together, so each server starts once
# (a module with its own server stops it); test_serve_e2e last of its group, as it ends with Ctrl-C.
SHARED_SERVERS = (
    ("test_responses_e2e.py", "test_serve_agent_apis_e2e.py", "test_serve_e2e.py"),
    (
        "test_hybrid_e2e.py",
        "test_responses_replicas_e2e.py",
        "test_speculative_e2e.py",
        "test_thinking_e2e.py",
        "test_lora_e2e.py",  # last: its requests stay out of the speculation stats the others read
    ),
)


def pytest_collection_modifyitems(session, config, items):
    """The end-to-end tests of each shared server one module after another (the default server's
    first), then the rest in their usual order (each of those starts its own `serve run` or
    cluster)."""
    e2e = [i for i, item in enumerate(items) if item.path.parent.name == "e2e"]
    if not e2e:
        return

    def key(item):
        name = item.path.name
        for group, modules in enumerate(SHARED_SERVERS):
            if name in modules:
                return group, modules.index(name)
        return len(SHARED_SERVERS), 0

    ordered = sorted((items[i] for i in e2e), key=key)  # stable: each module keeps its own order
    for i, item in zip(e2e, ordered):
        items[i] = item
