"""A random-weight model of a real model's shape, written as an MLX directory.

Throughput does not depend on weight values, so GPU benchmarks use the seed's shape
(Qwen3-0.6B, 8-bit) without downloading anything. The tokenizer is a byte-level BPE
vocabulary of the right size (as the real checkpoint's) with no merges and no chat template:
benchmarks drive it with token ids.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

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
}


def resolve_model(name: str, tokenizer: str | None = None) -> str:
    """`synthetic:<shape>` → a directory (made once per process); anything else is returned as is.
    `tokenizer`: a directory whose real tokenizer the synthetic model takes (its vocabulary
    size too), for benchmarks that need real text, such as grammars."""
    if not name.startswith("synthetic:"):
        return name
    shape = name.split(":", 1)[1]
    out = Path(tempfile.gettempdir()) / f"orchard-{shape}{'-' + Path(tokenizer).name if tokenizer else ''}"
    if not (out / "config.json").exists():
        make_synthetic_model(shape, out, tokenizer)
    return str(out)


def make_synthetic_model(shape: str, out: Path, tokenizer: str | None = None) -> Path:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = dict(SHAPES[shape])
    if tokenizer is not None:
        config["vocab_size"], config["eos_token_id"] = _copy_tokenizer(Path(tokenizer), out)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.bfloat16)  # as mlx-community checkpoints: bf16 weights, so bf16 scales and norms
    quant = config.get("quantization")
    if quant:
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"])
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is None:
        _write_tokenizer(out, config["vocab_size"])
    return out


def _copy_tokenizer(src: Path, out: Path) -> tuple[int, int]:
    """The tokenizer files of `src` into `out`; returns the vocabulary size (padded to 64) and
    the EOS id."""
    import shutil

    from tokenizers import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
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
    then the 256 byte symbols, then " t<id>" words; there are no merges: benchmarks send ids."""
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
