"""OpenBLAS for model processes on CPU-only Linux (engine.loading.cpu_fast_path): the preload handed
to children must start them, on machines with and without the system's libgfortran5. Real
processes and the real cmeel-openblas and numpy wheels; no model."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from engine.loading import cpu_fast_path

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or cpu_fast_path.wheel_openblas_dir() is None,
    reason="the cmeel-openblas wheel is an x86-64 Linux dependency",
)


def test_the_bundled_libgfortran_lets_the_wheels_openblas_load(monkeypatch, tmp_path):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))
    folders = cpu_fast_path._bundled_gfortran_dirs()
    if not folders:
        pytest.skip("neither numpy nor scipy bundles a libgfortran here")
    link = Path(folders[0]) / cpu_fast_path.GFORTRAN_SONAME
    assert link.is_symlink() and link.parent == tmp_path / "openblas-deps"
    # LD_LIBRARY_PATH is searched before the system's folders, so the child maps the bundled copy
    # even where libgfortran5 is installed: this shows the link works on every machine.
    env = {
        "LD_PRELOAD": cpu_fast_path.OPENBLAS_SONAME,
        "LD_LIBRARY_PATH": ":".join([str(cpu_fast_path.wheel_openblas_dir()), *folders]),
        "PATH": "/usr/bin:/bin",
    }
    code = "import ctypes; ctypes.CDLL(None).cblas_sgemm; print(open('/proc/self/maps').read())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(link.resolve()) in done.stdout and "libopenblas" in done.stdout
    assert cpu_fast_path._bundled_gfortran_dirs() == folders  # the second call keeps the link


def test_a_preload_that_cannot_load_is_never_handed_out(monkeypatch, caplog):
    monkeypatch.delenv("ORCHARD_OPENBLAS", raising=False)
    monkeypatch.setattr(cpu_fast_path, "_load_error", lambda *a: "libgfortran.so.5: cannot open shared object file")
    with caplog.at_level(logging.WARNING, logger=cpu_fast_path.__name__):
        assert cpu_fast_path.openblas_env() == {}
        assert cpu_fast_path.openblas_env(require_local=False) == {}
    assert "reference BLAS" in caplog.text and "libgfortran5" in caplog.text


def test_this_machines_preload_starts_a_process():
    env = cpu_fast_path.openblas_env()
    assert env, "OpenBLAS should load here: from the system or through the bundled libgfortran"
    assert cpu_fast_path._load_error(env["LD_PRELOAD"], env.get("LD_LIBRARY_PATH", "")) is None
