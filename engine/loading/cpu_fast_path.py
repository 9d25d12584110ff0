"""The fast path on CPU-only Linux: float32 weights and OpenBLAS instead of the reference BLAS.

The Linux mlx-cpu wheel links the netlib reference BLAS, so GEMM and quantized matmul crawl at a
few GFLOP/s. Dequantized float32 weights with Debian's OpenBLAS preloaded (it provides the same
cblas symbols) are ~40x faster. OpenBLAS must be in the process before MLX is loaded, so whatever
starts a model process sets LD_PRELOAD: `openblas_env()` for Ray actors and subprocesses,
`reexec_with_openblas()` for our own command-line entry points.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
_REEXEC_MARK = "ORCHARD_OPENBLAS_REEXEC"


def find_openblas() -> str | None:
    """Path of a system OpenBLAS (Debian: apt-get install libopenblas0-pthread), or None."""
    explicit = os.environ.get("ORCHARD_OPENBLAS")
    for candidate in ((explicit,) if explicit else ()) + OPENBLAS_CANDIDATES:
        if candidate and Path(candidate).exists():
            return candidate
    return None


def openblas_loaded() -> bool:
    """Whether OpenBLAS is mapped into this process (Linux only)."""
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def wants_fast_path() -> bool:
    """True on a CPU-only Linux MLX (no Metal, no CUDA)."""
    if not sys.platform.startswith("linux"):
        return False
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return not (mx.metal.is_available() or (cuda is not None and cuda.is_available()))


def openblas_env() -> dict[str, str]:
    """Environment variables that give a child process OpenBLAS ({} when none is installed)."""
    if not sys.platform.startswith("linux"):
        return {}
    path = find_openblas()
    if path is None:
        return {}
    preload = os.environ.get("LD_PRELOAD", "")
    if path in preload.split(":"):
        return {"LD_PRELOAD": preload}
    return {"LD_PRELOAD": ":".join(p for p in (path, preload) if p)}


def reexec_with_openblas() -> None:
    """Re-execute this Python process with OpenBLAS preloaded, once, when it would help.

    Call it first thing in a command-line entry point, before MLX does real work.
    """
    if not sys.platform.startswith("linux") or openblas_loaded() or os.environ.get(_REEXEC_MARK):
        return
    if not wants_fast_path():
        return
    env = openblas_env()
    if not env:
        return
    os.environ.update(env)
    os.environ[_REEXEC_MARK] = "1"
    argv = [sys.executable, *sys.orig_argv[1:]] if hasattr(sys, "orig_argv") else [sys.executable, *sys.argv]
    os.execv(sys.executable, argv)


def warn_if_slow() -> None:
    if not openblas_loaded():
        log.warning(
            "OpenBLAS is not loaded in this process: MLX on CPU falls back to the reference BLAS "
            "(~40x slower). Install libopenblas0-pthread and start the process with LD_PRELOAD=%s",
            find_openblas() or "<path to libopenblas.so.0>",
        )
