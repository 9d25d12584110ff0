"""LoRA adapters made for tests, on the bundled SmolLM2-135M-Instruct: mlx_lm's own LoRA layers
given random non-zero weights and saved as `mlx_lm.lora` saves them (adapter_config.json +
adapters.safetensors), and a malformed one (shapes that do not fit the base); the ones
tests/fixtures/agents.yaml serves."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from engine.loading.loader import LoadedModel, load_model

SMOLLM = "smollm2-135m-instruct"
KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
SERVED = {"sql": (1, 8), "poet": (2, 4), "chef": (3, 8)}  # tests/fixtures/agents.yaml's: name -> (seed, rank)


@functools.cache
def smollm() -> LoadedModel:
    """SmolLM2, loaded once per process: take its model through `fresh_model`."""
    return load_model(SMOLLM)


def fresh_model():
    """A copy of SmolLM2's model, as a load of its own would give: LoRA layers put into the copy
    (mlx_lm's `load_adapters`, `linear_to_lora_layers`, the engine's LoRA table) and freezing it
    leave the loaded model, and so the next copy, the plain base. A copy costs milliseconds (MLX
    arrays are immutable: the copies share their memory), a load seconds."""
    return copy.deepcopy(smollm().model)


@functools.cache
def lora_shapes(rank: int, num_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters `mlx_lm.lora` trains and saves: its LoRA layers on the base's KEYS."""
    model = fresh_model()
    model.freeze()  # as mlx_lm.lora does: only the LoRA layers train (and are saved)
    linear_to_lora_layers(model, num_layers, {"rank": rank, "scale": 4.0, "dropout": 0.0, "keys": KEYS})
    return [(k, v.shape) for k, v in tree_flatten(model.trainable_parameters())]


def make_adapter(path: Path, seed: int, rank: int, num_layers: int = 8, std: float = 0.1) -> Path:
    """An adapter as `mlx_lm.lora` writes one for the last `num_layers` layers, with random
    non-zero a and b (normal, `std`: at the defaults, enough to change SmolLM2's greedy answers)."""
    params = {"rank": rank, "scale": 4.0, "dropout": 0.0, "keys": KEYS}
    shapes = lora_shapes(rank, num_layers)  # first: making them draws random numbers (the layers' init)
    mx.random.seed(seed)
    weights = {k: mx.random.normal(shape) * std for k, shape in shapes}
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def make_malformed_adapter(path: Path, like: Path, suffix: str = "q_proj.lora_b", shape=(3, 7)) -> Path:
    """`like`'s adapter with its first tensor ending in `suffix` of a `shape` no SmolLM2 layer
    takes: both files there, readable, wrong for the base."""
    tensors = mx.load(str(like / "adapters.safetensors"))
    key = next(k for k in tensors if k.endswith(suffix))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), {**tensors, key: mx.zeros(shape)})
    (path / "adapter_config.json").write_text((like / "adapter_config.json").read_text())
    return path


def make_served_adapters(root: Path) -> Path:
    """tests/fixtures/agents.yaml's adapters under `root`: SERVED and `broken`, malformed."""
    for name, (seed, rank) in SERVED.items():
        make_adapter(root / name, seed=seed, rank=rank)
    make_malformed_adapter(root / "broken", like=root / "sql")
    smollm.cache_clear()  # the caller serves them: its server loads the model, this process needs it no more
    return root
