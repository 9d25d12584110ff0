"""What a model costs in memory: the host budget, a footprint estimate before load, the measured
footprint after it, and MLX's own limits for the process that holds the model.

A model's footprint is three numbers, all in bytes:

- weights: the parameters as loaded (float32 on the CPU fast path, quantized elsewhere),
- kv: the paged KV pool's byte budget (the pool grows lazily, but it may grow to this),
- working: the activations of a prefill at the engine's largest batch (prefill_batch_size
  prompts of prefill_step_size tokens).

Before a model was ever loaded the builder estimates it (`estimate_weights_bytes` from file
headers, `estimate_working_bytes`); after load the engine measures weights and working memory
(`measure_working_bytes`) and the governor uses that from then on.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION = 0.6  # of RAM where there is no Metal recommended working set
WARMUP_TOKENS = 16  # per row of the warm-up prefill that measures working memory


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv: int
    working: int
    measured: bool = False

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.working

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def mib(n: int | float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def host_memory_bytes() -> int:
    """What one host can give to models: Metal's recommended working set on a Mac, else RAM."""
    if sys.platform == "darwin":
        try:
            import mlx.core as mx

            if mx.metal.is_available():
                size = mx.device_info().get("max_recommended_working_set_size")
                if size:
                    return int(size)
        except Exception:  # noqa: BLE001 - fall back to RAM
            log.debug("no Metal working set size", exc_info=True)
    import psutil

    return int(psutil.virtual_memory().total)


def default_budget_bytes() -> int:
    """The host budget when the YAML sets none: the Metal working set on a Mac, else 60% of RAM."""
    total = host_memory_bytes()
    return total if sys.platform == "darwin" else int(total * DEFAULT_BUDGET_FRACTION)


def estimate_weights_bytes(source: str, fast_cpu: bool) -> int | None:
    """Bytes the weights will take once loaded, from file headers alone; None when unknown (a hub
    id that is not downloaded yet)."""
    from .loading import gguf, synthetic
    from .loading.loader import default_cache_dir
    from .loading.sources import resolve_source

    resolved = resolve_source(source)
    path = Path(resolved.location)
    if resolved.kind == "hub":
        path = _hub_snapshot(resolved.location)
        if path is None:
            return None
    elif resolved.kind == "synthetic":  # built here if it is not yet (once, into the cache the replica reads)
        path = synthetic.synthetic_dir(resolved.location, default_cache_dir())
    elif resolved.kind == "gguf":
        exported = default_cache_dir() / "gguf" / gguf.export_cache_key(path)
        if (exported / "config.json").exists():
            path = exported
        else:
            return _gguf_params(path) * 4 if fast_cpu else path.stat().st_size
    files = sorted(path.glob("*.safetensors"))
    if not fast_cpu:
        return sum(f.stat().st_size for f in files)
    bits = (json.loads((path / "config.json").read_text()).get("quantization") or {}).get("bits")
    return 4 * sum(safetensors_params(f, bits) for f in files)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The repo's directory in the local Hugging Face cache, if it was downloaded before."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 - not in the cache (or no hub library): unknown
        return None
    return path if (path / "config.json").exists() else None


def _gguf_params(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def safetensors_params(path: Path, bits: int | None) -> int:
    """Parameters in one safetensors file, read from its JSON header; quantized weights (uint32
    words with `.scales` beside them) count 32 / bits parameters a word, scales and biases none."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    total = 0
    for name, info in header.items():
        numel = math.prod(info["shape"])
        stem = name.rsplit(".", 1)[0]
        if bits and f"{stem}.scales" in header:
            if name.endswith(".weight"):
                total += numel * 32 // bits
            continue
        total += numel
    return total


def estimate_working_bytes(weights: int) -> int:
    """Activations before a measurement exists: a quarter of the weights, at least 64 MiB."""
    return max(64 * 2**20, weights // 4)


def measure_working_bytes(model, prefill_batch: int, prefill_tokens: int) -> int:
    """Peak transient MLX memory of a warm-up prefill (above what it holds after), scaled to a full chunk.

    The warm-up runs `prefill_batch` rows of WARMUP_TOKENS tokens through the model with a
    throwaway cache (it also compiles the kernels the first request would). Activations grow
    linearly with the tokens of a chunk (scaled up from the warm-up), attention scores with its
    square (added from the model's head count).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    rows, warm = max(1, prefill_batch), min(WARMUP_TOKENS, prefill_tokens)
    tokens = mx.zeros((rows, warm), dtype=mx.int32)
    mx.eval(tokens)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    model(tokens, cache=cache)  # like a prefill chunk: the caches are evaluated, the logits are not
    mx.eval([c.state for c in cache])
    held = mx.get_active_memory() - base  # the warm-up's own KV: the KV pool's share, not working memory
    peak = max(0, mx.get_peak_memory() - base - held)
    mx.clear_cache()
    heads = getattr(getattr(model, "args", None), "num_attention_heads", 0) or 0
    scores = rows * heads * prefill_tokens**2 * 4  # one layer's float32 attention scores at a time
    return int(peak * prefill_tokens / warm) + scores


def apply_process_limits(share_bytes: int) -> dict:
    """Cap MLX in this process at its share of the host budget, so that two model processes never
    both wire (or cache) the whole working set. Returns what was set.

    The buffer cache may fill what the share leaves: MLX's allocators (Metal and CUDA) reclaim
    cached buffers when active + cached memory would pass the memory limit, so the two together
    stay within the share, as MLX's own default (cache limit = memory limit) keeps them within its
    limit. A smaller cache limit costs speed and saves nothing the budget counts: a decode batch
    whose working copies grow frees buffers of the old sizes every few steps, and on CUDA each free
    over the limit is a cudaFree that waits for the device (measured: the lab notebook's *MLX's
    cache limit made the long steps*)."""
    import mlx.core as mx

    limits = {"memory_limit": share_bytes, "cache_limit": share_bytes}
    mx.set_memory_limit(limits["memory_limit"])
    mx.set_cache_limit(limits["cache_limit"])
    if mx.metal.is_available():
        limits["wired_limit"] = share_bytes
        mx.set_wired_limit(share_bytes)
    return limits
