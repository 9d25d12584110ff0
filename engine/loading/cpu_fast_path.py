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

The wheel's OpenBLAS needs `libgfortran.so.5`, which a machine without the system package
(Debian's libgfortran5) lacks: every process preloading it would die at exec. numpy's wheel bundles
a libgfortran 5 under another name, so the fallback links that name to it in the cache folder.
Before any preload is handed out, a throwaway process checks that it loads; if it cannot, the
process runs without it and the log says why (slow, never dead).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from .cache_dir import default_cache_dir

log = logging.getLogger(__name__)

OPENBLAS_SONAME = "libopenblas.so.0"
GFORTRAN_SONAME = "libgfortran.so.5"  # what the wheel's OpenBLAS links against
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
    start on another node) the soname is preloaded regardless. Either way it is {} when this
    machine has an OpenBLAS that cannot load (logged), since a child preloading it would not start.
    """
    if not sys.platform.startswith("linux"):
        return {}
    explicit = os.environ.get("ORCHARD_OPENBLAS")
    local = find_openblas()
    if require_local and local is None:
        return {}
    inherited = os.environ.get("LD_PRELOAD", "") if require_local else ""
    env = {"LD_PRELOAD": _prepend(explicit or OPENBLAS_SONAME, inherited, drop_openblas=True)}
    wheel = wheel_openblas_dir()
    library_path = os.environ.get("LD_LIBRARY_PATH", "")
    if wheel is not None and not explicit:
        env["LD_LIBRARY_PATH"] = _prepend(str(wheel), library_path)
    if local is None or (error := _load_error(env["LD_PRELOAD"], env.get("LD_LIBRARY_PATH", ""))) is None:
        return env
    if wheel is not None and not explicit and (extra := _bundled_gfortran_dirs()):
        env["LD_LIBRARY_PATH"] = ":".join([str(wheel), *extra, *[p for p in library_path.split(":") if p]])
        if (error := _load_error(env["LD_PRELOAD"], env["LD_LIBRARY_PATH"])) is None:
            return env
    log.warning(
        "OpenBLAS (%s) cannot be loaded on this machine (%s): model processes run without it, on the "
        "reference BLAS (much slower). Install the system's libgfortran5, or set ORCHARD_OPENBLAS.",
        local,
        error,
    )
    return {}


@functools.cache
def _load_error(preload: str, library_path: str) -> str | None:
    """None when a process starts with this preload, else the dynamic loader's complaint."""
    true = shutil.which("true") or "/bin/true"
    env = {**os.environ, "LD_PRELOAD": preload, "LD_LIBRARY_PATH": library_path}
    try:
        done = subprocess.run([true], env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit status {done.returncode}")


def _bundled_gfortran_dirs() -> list[str]:
    """Folders that let the wheel's OpenBLAS find `libgfortran.so.5` without the system package:
    one holding that name, linked to the copy numpy's (or scipy's) wheel bundles under another
    name, and the copy's own folder (its renamed libquadmath). [] when no wheel bundles one."""
    bundled = next(
        (
            found
            for key in ("purelib", "platlib")
            for libs in ("numpy.libs", "scipy.libs")
            for found in sorted((Path(sysconfig.get_paths()[key]) / libs).glob("libgfortran-*.so.5*"))
        ),
        None,
    )
    if bundled is None:
        return []
    folder = default_cache_dir() / "openblas-deps"
    link = folder / GFORTRAN_SONAME
    try:
        if not (link.is_symlink() and link.resolve() == bundled.resolve()):
            folder.mkdir(parents=True, exist_ok=True)
            staged = folder / f".{GFORTRAN_SONAME}.{os.getpid()}"
            staged.unlink(missing_ok=True)
            staged.symlink_to(bundled)
            os.replace(staged, link)  # atomic: processes racing here agree
    except OSError as e:
        log.warning("could not link %s to %s: %s", link, bundled, e)
        return []
    return [str(folder), str(bundled.parent)]


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
