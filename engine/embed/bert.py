"""A BERT encoder in MLX (Hugging Face's `BertModel`, absolute positions, post-LayerNorm): the
last hidden states of a padded batch, each row attending only to its own real tokens.

Weights load from the `BertModel` names (`embeddings.word_embeddings.weight`,
`encoder.layer.N.attention.self.query.weight`, ...; a `bert.` prefix is stripped); the pooler and
`position_ids` buffer are not used.

Our own rather than mlx-embeddings': mlx-embeddings 0.1.0 requires mlx-vlm (which pulls datasets,
mlx-audio, opencv-python, fastapi...) and transformers[sentencepiece] for every model it serves,
and a BERT is this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

# HF name (after `encoder.layer.N.`) → ours
RENAMES = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
ACTIVATIONS = {"gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx, "relu": nn.relu}


@dataclass(frozen=True)
class BertArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"

    @classmethod
    def from_config(cls, config: dict) -> BertArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


class Attention(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        dim = args.hidden_size
        self.heads = args.num_attention_heads
        self.scale = (dim // self.heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, D = x.shape

        def split(t):
            return t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out(y.transpose(0, 2, 1, 3).reshape(B, L, D))


class Layer(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.ffn_in = nn.Linear(args.hidden_size, args.intermediate_size)
        self.ffn_out = nn.Linear(args.intermediate_size, args.hidden_size)
        self.ffn_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.attention_norm(x + self.attention(x, mask))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class Embeddings(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, ids: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1])
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class Bert(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.layers = [Layer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, ids: mx.array, attention_mask: mx.array) -> mx.array:
        """ids, attention_mask: [B, L] (mask 1 on real tokens) → hidden states [B, L, hidden]."""
        mask = attention_mask.astype(mx.bool_)[:, None, None, :]  # keys only: padding is never attended to
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for name, value in weights.items():
            name = name.removeprefix("bert.")
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                continue
            if name.startswith("encoder.layer."):
                index, _, rest = name.removeprefix("encoder.layer.").partition(".")
                stem, _, leaf = rest.rpartition(".")
                name = f"layers.{index}.{RENAMES.get(stem, stem)}.{leaf}"
            out[name] = value
        return out
