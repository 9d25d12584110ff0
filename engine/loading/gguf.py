"""GGUF → MLX: read a llama.cpp file and write an MLX directory that `mlx_lm.load` opens.

One conversion serves every path: the loader exports once into a cache directory and then loads
through mlx_lm like any MLX model, and users can export explicitly to share the weights with other
MLX tools (`python -m engine.cli export`).

- Q4_0 / Q4_1 / Q8_0 (and F16/F32) files are read with `mx.load`, which keeps them as MLX affine
  quantized tensors (group 32), so Metal and CUDA run them quantized.
- Files with K-quants (Q4_K, Q6_K, Q5_0, ...) are expanded with the `gguf` package's
  `quants.dequantize` and stored as float32.
- llama.cpp permutes the Q/K rows of llama models for its RoPE layout; we undo it.
- llama.cpp stores Gemma's RMSNorm weights with 1 added; mlx_lm's Gemma applies (1 + w), so we
  subtract it back.
- The tokenizer (byte-level BPE or SentencePiece-style) and chat template come from the metadata,
  built by transformers' GGUF tokenizer mapping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

EXPORT_VERSION = "1"  # bump when the exported layout changes: invalidates cached exports
MLX_NATIVE_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}
SUPPORTED_ARCHS = ("llama", "gemma3")

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "llama": {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    },
    "gemma3": {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_TENSOR_RE = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|scales|biases|bias)$")


@dataclass
class GGUFInfo:
    """What the loader needs to know about a file before converting it."""

    path: Path
    arch: str
    metadata: dict
    tensor_types: dict[str, str]  # tensor name -> ggml type name

    @property
    def mlx_native(self) -> bool:
        return set(self.tensor_types.values()) <= MLX_NATIVE_TYPES

    def get(self, key: str, default=None):
        return self.metadata.get(f"{self.arch}.{key}", default)


def read_info(path: str | Path) -> GGUFInfo:
    """Read metadata and tensor types; a clear error for corrupt, truncated or unsupported files."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        reader = GGUFReader(path)
        metadata = {k: _field_value(f) for k, f in reader.fields.items()}
        types = {t.name: t.tensor_type.name for t in reader.tensors}
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors alike
        raise ModelLoadError(f"{path.name} is not a readable GGUF file (corrupt or truncated?): {exc}") from exc
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{path.name}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    return GGUFInfo(path, arch, metadata, types)


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - exotic field types are not needed downstream
        return None


def export_cache_key(path: Path) -> str:
    """A cheap fingerprint of a GGUF file: size, mtime and its first and last MiB."""
    stat = path.stat()
    digest = hashlib.sha256(f"{EXPORT_VERSION}:{stat.st_size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, stat.st_size - (1 << 20)))
        digest.update(f.read())
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def export_mlx(path: str | Path, out_dir: str | Path, dequantize: bool = False, replace: bool = True) -> Path:
    """Convert a GGUF file into an MLX model directory at out_dir (written atomically).

    Each export writes into its own temporary directory beside out_dir and renames it into place,
    so processes exporting the same file at once never touch each other's work. `replace=False`
    (the loader's export cache): a complete out_dir that appeared meanwhile is kept, the first
    rename wins.

    `dequantize=True` writes float32 weights (for MLX's CPU backend on Linux, see cpu_fast_path).
    """
    info = read_info(path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".partial-", dir=out_dir.parent))
    try:
        return _export_into(info, tmp, out_dir, dequantize, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_into(info: GGUFInfo, tmp: Path, out_dir: Path, dequantize: bool, replace: bool) -> Path:
    start = time.perf_counter()
    weights, quantized = load_weights(info)
    if quantized and dequantize:
        weights, quantized = dequantize_weights(weights), False
    config = make_config(info, set(weights))
    if quantized:
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(info, tmp)
    if not replace and (out_dir / "config.json").exists():
        log.info("%s was exported by another process meanwhile; using it", out_dir)
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process renamed its export into place first
        if replace or not (out_dir / "config.json").exists():
            raise
    log.info("exported %s to %s in %.1fs", info.path.name, out_dir, time.perf_counter() - start)
    return out_dir


# --- weights -------------------------------------------------------------------------------


def load_weights(info: GGUFInfo) -> tuple[dict[str, mx.array], bool]:
    """Weights under mlx_lm's names; True when they stayed quantized."""
    if info.mlx_native:
        try:
            raw = mx.load(str(info.path))
        except Exception as exc:
            raise ModelLoadError(f"{info.path.name}: mx.load failed (corrupt or truncated?): {exc}") from exc
        quantized = any(k.endswith(".scales") for k in raw)
    else:
        raw = _dequantize_all(info)
        quantized = False
    weights = {}
    for name, value in raw.items():
        new_name, value = _convert_tensor(info, name, value)
        if new_name is not None:
            weights[new_name] = value
    return weights, quantized


def dequantize_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Expand MLX affine-quantized triplets (weight, scales, biases; group 32) to float32."""
    out = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{stem}.scales" in weights:
            scales, biases = weights[f"{stem}.scales"], weights[f"{stem}.biases"]
            bits = value.shape[-1] * 32 // (scales.shape[-1] * 32)
            value = mx.dequantize(value, scales, biases, group_size=32, bits=bits)
        out[name] = value.astype(mx.float32) if mx.issubdtype(value.dtype, mx.floating) else value
    return out


def _dequantize_all(info: GGUFInfo) -> dict[str, mx.array]:
    from gguf import GGMLQuantizationType, GGUFReader, quants

    out = {}
    tensors = GGUFReader(info.path).tensors
    for index, tensor in enumerate(tensors):
        if index % max(1, len(tensors) // 4) == 0:
            log.info("dequantizing %s: tensor %d/%d", info.path.name, index, len(tensors))
        try:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"{info.path.name}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from exc
        if tensor.tensor_type not in (GGMLQuantizationType.F32,):
            values = values.astype(np.float32)
        out[f"{tensor.name}"] = mx.array(values)
    return out


def _convert_tensor(info: GGUFInfo, name: str, value: mx.array):
    """Rename one tensor and apply the per-architecture fix-ups."""
    match = _TENSOR_RE.match(name)
    if match is None:
        log.debug("skipping tensor %s", name)
        return None, value
    layer, base, suffix = match.groups()
    if name == "rope_freqs.weight":
        raise UnsupportedModelError(f"{info.path.name}: rope frequency tensors (Llama 3.1 scaling) are not supported")
    if layer is None:
        if base not in _TOP_LEVEL:
            log.debug("skipping tensor %s", name)
            return None, value
        new = _TOP_LEVEL[base]
    else:
        local = _LAYER_NAMES[info.arch].get(base)
        if local is None:
            raise UnsupportedModelError(f"{info.path.name}: unexpected tensor {name} for {info.arch}")
        new = f"model.layers.{layer}.{local}"
    if info.arch == "llama" and base in ("attn_q", "attn_k"):
        heads = info.get("attention.head_count") if base == "attn_q" else info.get("attention.head_count_kv")
        value = unpermute_rope_rows(value, int(heads))
    if info.arch == "gemma3" and base.endswith("norm") and suffix == "weight":
        value = value - 1.0
    return f"{new}.{suffix}", value


def unpermute_rope_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's `permute` of Q/K rows (interleaved → half-split RoPE layout).

    Quantization runs along the input dimension, so rows of packed weights, scales and biases
    move together and the same row permutation applies to each.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- config --------------------------------------------------------------------------------


def make_config(info: GGUFInfo, weight_names: set[str]) -> dict:
    """An HF-style config.json for mlx_lm's llama or gemma3_text model."""
    g = info.get
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    common = {
        "hidden_size": hidden,
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "vocab_size": len(info.metadata["tokenizer.ggml.tokens"]),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "lm_head.weight" not in weight_names,
        "eos_token_id": int(info.metadata["tokenizer.ggml.eos_token_id"]),
        "bos_token_id": int(info.metadata.get("tokenizer.ggml.bos_token_id", 0)),
        "orchard_source": {"gguf": info.path.name, "file_type": info.metadata.get("general.file_type")},
    }
    if info.arch == "llama":
        return {"model_type": "llama", "rope_theta": float(g("rope.freq_base", 10000.0)), **common}
    blocks = common["num_hidden_layers"]
    # llama.cpp: Gemma 3 27B scales queries by hidden/heads, the others by head_dim.
    scalar = hidden // heads if blocks == 62 else common["head_dim"]
    config = {
        "model_type": "gemma3_text",
        "rope_theta": float(g("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(g("attention.sliding_window", 512)),
        "sliding_window_pattern": 6,
        **common,
    }
    if (factor := g("rope.scaling.factor")) is not None:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return config


# --- tokenizer -----------------------------------------------------------------------------

_TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}


def write_tokenizer(info: GGUFInfo, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) from GGUF metadata."""
    from tokenizers import pre_tokenizers, processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    meta = info.metadata
    spec = {
        name: meta[f"tokenizer.ggml.{key}"] for key, name in _TOKENIZER_KEYS.items() if f"tokenizer.ggml.{key}" in meta
    }
    try:
        tokenizer, _ = convert_gguf_tokenizer(info.arch, spec)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{info.path.name}: cannot build its tokenizer: {exc}") from exc
    if spec.get("pre_tokenizer_type") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits every digit before the GPT-2 split.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    tokens = spec["tokens"]
    special = {
        name: tokens[int(spec[key])]
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unk_token_id"),
            ("pad_token", "pad_token_id"),
        )
        if key in spec
    }
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", spec.get("tokenizer_type") == "llama"))
    if add_bos and "bos_token" in special:
        bos = (special["bos_token"], int(spec["bos_token_id"]))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]
        )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(info.get("context_length", 4096)),
        **special,
    }
    if template := meta.get("tokenizer.chat_template"):
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
