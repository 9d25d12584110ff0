"""LoRA adapters in one batch (engine.lora) on the bundled SmolLM2-135M-Instruct (real weights):
adapters made here, in mlx_lm's format (its own LoRA layers, given random non-zero weights, saved
as `mlx_lm.lora` saves them). A batch whose rows are the base, one adapter and another gives each
row the logits mlx_lm gives that adapter alone (`mlx_lm.tuner.utils.load_adapters`), and a
malformed adapter is refused with the reason."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from engine.errors import ModelLoadError
from engine.loading.loader import load_model
from engine.lora import LoRATable, read_adapter

from ..conftest import SMOLLM

KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
PROMPT = [1, 504, 3575, 282, 4649, 314, 7042, 30, 2, 198]


def make_adapter(path, seed: int, rank: int, num_layers: int = 4) -> None:
    """An adapter as `mlx_lm.lora` writes one, with random non-zero a and b."""
    model = load_model(SMOLLM).model
    params = {"rank": rank, "scale": 4.0, "dropout": 0.0, "keys": KEYS}
    model.freeze()  # as mlx_lm.lora does: only the LoRA layers train (and are saved)
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    weights = {k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(model.trainable_parameters())}
    path.mkdir()
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "a", seed=1, rank=8)
    make_adapter(root / "b", seed=2, rank=4)
    return root


def reference_logits(path=None) -> mx.array:
    model = load_model(SMOLLM).model
    if path is not None:
        load_adapters(model, str(path))
    return model(mx.array([PROMPT]))[0]


def test_a_mixed_batch_gives_each_row_its_own_adapters_logits(adapters):
    base = load_model(SMOLLM).model
    a, b = read_adapter("a", adapters / "a", base), read_adapter("b", adapters / "b", base)
    table = LoRATable(base, slots=2)
    table.attach(sorted(set(a.weights) | set(b.weights)), rank=8)
    table.put(1, a)
    table.put(2, b)
    table.use([0, 1, 2, 1])
    got = base(mx.array([PROMPT] * 4))
    refs = [reference_logits(), reference_logits(adapters / "a"), reference_logits(adapters / "b")]
    for row, slot in enumerate([0, 1, 2, 1]):
        assert mx.allclose(got[row], refs[slot], atol=1e-3).item(), (row, mx.abs(got[row] - refs[slot]).max())
    assert not mx.allclose(refs[1], refs[0], atol=1e-2).item(), "the adapter changes the logits"
    table.use([0, 0, 0, 0])
    assert table.rows is None
    assert mx.allclose(base(mx.array([PROMPT]))[0], refs[0], atol=1e-4).item()


def test_a_malformed_adapter_is_refused_with_the_reason(adapters, tmp_path):
    base = load_model(SMOLLM).model
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_adapter("missing", tmp_path / "nowhere", base)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((adapters / "a" / "adapter_config.json").read_text())
    tensors = mx.load(str(adapters / "a" / "adapters.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_b"))
    mx.save_safetensors(str(wrong / "adapters.safetensors"), {**tensors, key: mx.zeros((8, 7))})
    with pytest.raises(ModelLoadError, match=r"q_proj has lora_a .* the base layer needs"):
        read_adapter("wrong", wrong, base)
    mx.save_safetensors(
        str(wrong / "adapters.safetensors"),
        {"model.nope.lora_a": mx.zeros((2, 2)), "model.nope.lora_b": mx.zeros((2, 2))},
    )
    with pytest.raises(ModelLoadError, match="not a linear layer"):
        read_adapter("wrong", wrong, base)
    config = json.loads((adapters / "a" / "adapter_config.json").read_text()) | {"fine_tune_type": "dora"}
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="dora"):
        read_adapter("wrong", wrong, base)
