"""What the router process may import: no MLX (it moves bytes and dicts); the replica's side of
prefix affinity nothing of the router's side; the event stream and the shared HTTP pieces no API."""

from __future__ import annotations

import subprocess
import sys

# Every module the router process (and the app builder) imports by path.
ROUTER_SIDE = [
    "deployments.app",
    "deployments.router",
    "deployments.governor",
    "deployments.request_router",
    "deployments.config",
    "deployments.openai.serving",
    "deployments.openai.embeddings",
    "deployments.embedding_server",
    "deployments.anthropic.serving",
]


def imported_after(*modules: str) -> set[str]:
    """The modules loaded in a fresh interpreter once `modules` are imported."""
    code = "import sys, " + ", ".join(modules) + "; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_the_router_process_never_imports_mlx():
    loaded = imported_after(*ROUTER_SIDE)
    assert "deployments.router" in loaded
    assert not {m for m in loaded if m == "mlx" or m.startswith(("mlx.", "mlx_lm"))}
    assert "engine.constraints" not in loaded and "engine.sampling" not in loaded


def test_the_replicas_prefix_residency_does_not_import_the_request_router():
    loaded = imported_after("deployments.prefix_residency")
    assert "deployments.prefix_hashing" in loaded and "deployments.request_router" not in loaded


def test_the_event_stream_and_the_http_pieces_know_no_api():
    loaded = imported_after(
        "deployments.events", "deployments.http.auth", "deployments.http.sse", "deployments.http.body"
    )
    assert "deployments.events" in loaded
    assert not {
        m for m in loaded if m.startswith(("deployments.openai", "deployments.anthropic", "deployments.router"))
    }
