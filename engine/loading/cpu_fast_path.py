"""The fast path on CPU-only Linux: float32 weights and OpenBLAS instead of the reference BLAS.

The Linux mlx-cpu wheel links the netlib reference BLAS, so GEMM and quantized matmul crawl.
Dequantized float32 weights with OpenBLAS preloaded (it provides the same cblas symbols) are much
faster (docs/benchmarks.md). OpenBLAS comes from the `cmeel-openblas` wheel, a dependency on x86-64
Linux (an unprefixed pthreads `libopenblas.so.0` under `site-packages/cmeel.prefix/lib`); a system
OpenBLAS (Debian's libopenblas0-pthread) is the fallback. OpenBLAS must be in the process before
MLX is loaded, so whatever starts a model process sets LD_PRELOAD: `openblas_env()` for Ray
actors and subprocesses, `reexec_with_openblas()` for our own command-line entry points.

The preload names the library by its soname and puts the wheel's directory first on
LD_LIBRARY_PATH, so a process on another machine of a cluster finds its own copy (the same venv
path, or its system library) and a machine with neither only gets the dynamic loader's warning.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)

OPENBLAS_SONAME = "libopenblas.so.0"
SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
_REEXEC_MARK = "ORCHARD_OPENBLAS_REEXEC"


def wheel_openblas_dir() -> Path | None:
    """The cmeel-openblas wheel's library directory in this environment, or None."""
    for key in ("purelib", "platlib"):
        lib = Path(sysconfig.get_paths()[key]) / "cmeel.prefix" / "lib"
        if (lib / OPENBLAS_SONAME).exists():
            return lib
    return None


def find_openblas() -> str | None:
    """Path of the OpenBLAS a child process will preload: `ORCHARD_OPENBLAS` if set, else the
    cmeel-openblas wheel's, else a system one (Debian's libopenblas0-pthread); None if none."""
    explicit = os.environ.get("ORCHARD_OPENBLAS")
    if explicit:
        return explicit if Path(explicit).exists() else None
    wheel = wheel_openblas_dir()
    if wheel is not None:
        return str(wheel / OPENBLAS_SONAME)
    return next((c for c in SYSTEM_CANDIDATES if Path(c).exists()), None)


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


def _prepend(entry: str, value: str, drop_openblas: bool = False) -> str:
    """`entry` first in a colon-separated list, once (and, for LD_PRELOAD, the only OpenBLAS)."""
    parts = [p for p in value.split(":") if p and p != entry]
    if drop_openblas:
        parts = [p for p in parts if not Path(p).name.startswith("libopenblas")]
    return ":".join([entry, *parts])


def openblas_env(require_local: bool = True) -> dict[str, str]:
    """Environment variables that give a child process OpenBLAS.

    `ORCHARD_OPENBLAS` is preloaded by its path; otherwise the soname, found first in the wheel's
    directory (prepended to LD_LIBRARY_PATH), then in the system's. With `require_local` (a child
    on this machine) it is {} when this machine has no OpenBLAS; without it (a Ray actor that may
    start on another node) the soname is preloaded regardless.
    """
    if not sys.platform.startswith("linux"):
        return {}
    explicit = os.environ.get("ORCHARD_OPENBLAS")
    if require_local and find_openblas() is None:
        return {}
    inherited = os.environ.get("LD_PRELOAD", "") if require_local else ""
    env = {"LD_PRELOAD": _prepend(explicit or OPENBLAS_SONAME, inherited, drop_openblas=True)}
    wheel = wheel_openblas_dir()
    if wheel is not None and not explicit:
        env["LD_LIBRARY_PATH"] = _prepend(str(wheel), os.environ.get("LD_LIBRARY_PATH", ""))
    return env


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
            "(much slower). Reinstall mlx-orchard (its cmeel-openblas dependency) or start the process with LD_PRELOAD=%s",
            find_openblas() or "<path to libopenblas.so.0>",
        )
