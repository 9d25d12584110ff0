"""Loaded with `-p tests.openblas_plugin` (pyproject addopts), before pytest captures output:
re-executes the test process with OpenBLAS preloaded on CPU-only Linux (engine.loading.cpu_fast_path)."""

from engine.loading.cpu_fast_path import reexec_with_openblas

reexec_with_openblas()
