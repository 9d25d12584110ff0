"""What every benchmark ends with: the machine it ran on, markdown tables, the JSON document.

Each suite builds one JSON document (its `machine` first) and one markdown table, and hands both to
`emit`: the JSON and the table go to stdout, the JSON to `--json-out` when given.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("httpx", "matplotlib", "tqdm", "mlx", "mlx-lm", "ray")


def machine() -> dict:
    """The host and the package versions: for suites that talk to a server over HTTP."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1) if mem else None,
        "python": platform.python_version(),
        "packages": versions,
        "command": " ".join(sys.orig_argv),
    }


def mlx_machine() -> dict:
    """The host, MLX's device and whether OpenBLAS is preloaded: for suites that run the engine in-process."""
    import mlx.core as mx
    import mlx_lm

    from engine.loading.cpu_fast_path import openblas_loaded

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "openblas_preloaded": openblas_loaded(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.orig_argv),
    }


def fmt(v, suffix: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v}{suffix}"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(doc: dict, path: str | Path, indent: int = 2) -> None:
    Path(path).write_text(json.dumps(doc, indent=indent) + "\n")


def emit(doc: dict, table: str, path: str | Path | None = None) -> None:
    """The JSON document and its table on stdout; the JSON also to PATH when given."""
    print(json.dumps(doc, indent=2))
    print(table)
    if path:
        write_json(doc, path)
