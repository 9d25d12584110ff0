"""Random-weight models of real models' shapes, as a model source: `synthetic:<name>`.

Two kinds of names:
  synthetic:qwen3-0.6b-8bit   a real model's full shape (Qwen3-0.6B, 8-bit): throughput does not
                              depend on weight values, so GPU benchmarks use it without downloading
  synthetic:qwen3.5-0.8b-8bit the same for a hybrid model (Qwen3.5-0.8B's text layers, 8-bit)
  synthetic:gemma3-vlm        a vision-language model (engine.loading.synthetic_vlm): mlx-vlm's
                              gemma3 at a tiny size, or gemma-3-4b's shapes (gemma-3-4b-vlm)
  synthetic:<family>          a tiny model of one mlx_lm family (engine.loading.families): the
                              family's real config scaled down, its distinctive layers kept, for
                              conformance tests of every cache kind

The directory is built once into the cache (`<cache>/synthetic/<name>-<digest>`; the digest covers
the config and the way it is built) and then loaded by `mlx_lm.load` like any MLX directory.
Weights are seeded: the same name builds the same model. The tokenizer is a byte-level BPE
vocabulary of the config's size with no merges and no chat template, EOS id 0: callers drive these
models with token ids (or give a real tokenizer, `synthetic_dir(..., tokenizer=DIR)`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelLoadError
from . import families, synthetic_vlm

PREFIX = "synthetic:"
# Bump when the way a directory is built changes (weights, tokenizer): cached builds are rebuilt.
BUILD_VERSION = 1

SHAPES = {
    "qwen3-0.6b-8bit": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "intermediate_size": 3072,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
        "quantization": {"group_size": 64, "bits": 8},
    },
    # Qwen3.5's text architecture at the 0.8B width, random weights. The numbers are the text_config
    # of Qwen/Qwen3.5-0.8B's config.json as third-party code quotes it (a test that mirrors that file,
    # and another test config with the same numbers); Qwen's own file could not be read from here,
    # so they are checked against those copies only: hidden 1024, 24 layers as 3 gated
    # delta-net : 1 full attention, linear heads 16 key / 16 value x 128, conv kernel 4, attention
    # 8 heads / 2 KV heads x 256, intermediate 3584, vocabulary 248320, tied embeddings, partial
    # multimodal RoPE. Ours: EOS 0 (the byte-level tokenizer's), the vocabulary also at the top
    # level (where the tokenizer is built from), and, as for qwen3-0.6b-8bit, bf16 quantized to
    # 8 bits in groups of 64 as mlx-community checkpoints are. The vision tower is left out.
    "qwen3.5-0.8b-8bit": {
        "model_type": "qwen3_5",
        "text_config": {
            "model_type": "qwen3_5_text",
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6,
            "full_attention_interval": 4,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 16,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 256,
            "intermediate_size": 3584,
            "vocab_size": 248320,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": [11, 11, 10],
                "rope_type": "default",
                "rope_theta": 10_000_000,
                "partial_rotary_factor": 0.25,
            },
            "tie_word_embeddings": True,
            "eos_token_id": 0,
        },
        "vocab_size": 248320,
        "tie_word_embeddings": True,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
        "quantization": {"group_size": 64, "bits": 8},
    },
}


def names() -> list[str]:
    """Every synthetic model's name (without the `synthetic:` prefix)."""
    return sorted(SHAPES) + sorted(synthetic_vlm.VLMS) + sorted(families.FAMILIES)


def config_of(name: str) -> dict:
    if name in SHAPES:
        return dict(SHAPES[name])
    if name in synthetic_vlm.VLMS:
        return synthetic_vlm.config_of(name)
    if name in families.FAMILIES:
        return families.config(name)
    raise ModelLoadError(f"unknown synthetic model {name!r}; known: {', '.join(names())}")


def synthetic_path(name: str, cache_dir: Path | str, tokenizer: str | None = None) -> Path:
    """Where `synthetic:<name>` is (or will be) built under `cache_dir`: named by a digest of its
    config and the way it is built, so a changed family is built again."""
    name = name.removeprefix(PREFIX)
    weights = _weights_spec(families.FAMILIES[name]) if name in families.FAMILIES else None
    if name in synthetic_vlm.VLMS:
        weights = {"seed": families.SEED, "scales": synthetic_vlm.VLMS[name][2:], "noise": families.NOISE}
    tok = str(Path(tokenizer).resolve()) if tokenizer else None
    spec = json.dumps([BUILD_VERSION, config_of(name), weights, tok], sort_keys=True)
    return Path(cache_dir) / "synthetic" / f"{name}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def synthetic_dir(name: str, cache_dir: Path | str, tokenizer: str | None = None) -> Path:
    """The directory of `synthetic:<name>` under `cache_dir`, built on first use. Processes that
    build the same name at once each write their own temporary directory; the first rename wins.
    `tokenizer`: a directory whose real tokenizer (and vocabulary size) the model takes."""
    out = synthetic_path(name, cache_dir, tokenizer)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        make_synthetic_model(name.removeprefix(PREFIX), tmp, tokenizer)
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").exists():  # not another process's finished build: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def local_source(source: str, cache_dir: Path | str, tokenizer: str | None = None) -> str:
    """`synthetic:<name>` as its built directory, for what loads only directories (peer servers) or
    gives the model a real `tokenizer`; any other source as it is."""
    if not source.startswith(PREFIX):
        return source
    return str(synthetic_dir(source, cache_dir, tokenizer))


def make_synthetic_model(name: str, out: Path, tokenizer: str | None = None) -> Path:
    """Write the MLX directory of `name` into `out`: config.json, model.safetensors, tokenizer."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    if name in synthetic_vlm.VLMS:
        return synthetic_vlm.make_synthetic_vlm(name, out, randomize)
    config = config_of(name)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        config["vocab_size"], config["eos_token_id"] = _copy_tokenizer(Path(tokenizer), out)
    model_class, args_class = _get_classes(config)
    if name in families.FAMILIES:
        mx.random.seed(families.SEED)
        model = model_class(args_class.from_dict(config))
        randomize(model, families.FAMILIES[name])
    else:
        model = model_class(args_class.from_dict(config))
        _cast_bf16(model)
    quant = config.get("quantization")
    if quant:
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"])
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is None:
        _write_tokenizer(out, config["vocab_size"])
    return out


def _cast_bf16(model) -> None:
    """bf16 weights, so bf16 scales and norms, as mlx-community checkpoints are; what the model's
    `cast_predicate` keeps out (Qwen3.5's `A_log`) stays float32, as mlx_lm's convert leaves it."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path, p):
        return p.astype(mx.bfloat16) if keep(path) and mx.issubdtype(p.dtype, mx.floating) else p

    model.update(tree_map_with_path(cast, model.parameters()))


def _weights_spec(family: families.Family) -> dict:
    """What a family's weights are drawn from, beside its config (part of a build's name)."""
    return {"seed": families.SEED, "scale": family.scale, "embed_scale": family.embed_scale, "noise": families.NOISE}


def randomize(model, family: families.Family) -> None:
    """Seeded random weights that make a tiny model's greedy output depend on its context, from
    the model's own initialisation (seed MLX's generator before building it): weight matrices
    scaled by the family's `scale` (its embeddings by `embed_scale`), noise on every vector,
    Mamba2's init for `A_log` (A uniform in [1, 16]) and `dt_bias` (dt log-uniform in [1e-3, 1e-1])."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    out = []
    for i, (path, p) in enumerate(tree_flatten(model.parameters())):
        key = mx.random.key(families.SEED * 1_000_003 + i)
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p = mx.log(mx.random.uniform(1.0, 16.0, p.shape, key=key))
        elif leaf == "dt_bias":
            dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), p.shape, key=key))
            p = dt + mx.log(-mx.expm1(-dt))  # the inverse of softplus
        elif p.ndim >= 2:
            embed = family.embed_scale is not None and "embed" in path
            p = p * (family.embed_scale if embed else family.scale)
        else:
            p = p + families.NOISE * mx.random.normal(p.shape, key=key)
        out.append((path, p.astype(mx.float32)))
    model.update(tree_unflatten(out))
    mx.eval(model.parameters())


def _copy_tokenizer(src: Path, out: Path) -> tuple[int, int]:
    """The tokenizer files of `src` into `out`; returns the vocabulary size (padded to 64) and
    the EOS id."""
    from tokenizers import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    eos = json.loads((src / "config.json").read_text()).get("eos_token_id", 0) if (src / "config.json").exists() else 0
    size = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return -(-size // 64) * 64, eos


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of the model's size, as real Qwen/Llama checkpoints have, so
    that mlx_lm streams text through its incremental BPE detokenizer (a word-level vocabulary
    gets its naive one, which re-decodes every sequence's whole text each token). Id 0 is EOS,
    then the 256 byte symbols, then " t<id>" words; there are no merges: callers send ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    eos = "<|endoftext|>"
    symbols = ByteLevel.alphabet()
    vocab = {eos: 0, **{c: 1 + i for i, c in enumerate(sorted(symbols))}}
    vocab.update({f"\u0120t{i}": i for i in range(len(vocab), vocab_size)})  # \u0120 is the byte-level space
    tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(eos, special=True)])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos})
    )
