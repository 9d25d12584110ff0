"""Where mlx-orchard keeps what it makes on disk (exports, synthetic models, batch checks, the disk
KV tier, links for OpenBLAS): `ORCHARD_CACHE`, else `$XDG_CACHE_HOME/mlx-orchard` (~/.cache)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    root = os.environ.get("ORCHARD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mlx-orchard")
    return Path(root).expanduser()
