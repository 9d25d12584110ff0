"""LoRA adapters of one base model, each row of a batch under its own (issue 37): the adapters'
files and the batched layer. Which adapters are resident, and loading them, is engine.adapters.

An adapter is what `mlx_lm.lora` writes: `adapter_config.json` (`fine_tune_type: lora`,
`lora_parameters: {rank, scale, ...}`) and `adapters.safetensors`, whose `<module>.lora_a`
[in, rank] and `<module>.lora_b` [rank, out] pairs update the base's linear layers:
y = base(x) + scale * (x @ a) @ b. `read_adapter` checks it against the base (every module it names
is a linear layer of the base, with matching shapes) and refuses a malformed one with the reason;
it is `read_files` (numpy only: a loader thread may run it) then `check_adapter` (MLX: the engine's
thread).

`LoRATable` holds the resident adapters stacked per module ([slots, in, rank] and [slots, rank,
out]; slot 0 is "no adapter", all zeros) and, for the forward call at hand, each row's slot. The
base model's targeted linear layers are wrapped once (`LoRATable.attach`, through the modules'
public `update_modules`, as mlx_lm's own LoRA does) by `BatchedLoRALinear`, which adds each row's
update with two `mx.gather_mm` (the rows' adapters gathered by index, the way mixture-of-experts
layers gather experts): one product for the whole batch whatever its mix of adapters, and nothing
at all when no row has one (`rows` None: a base-only batch pays nothing). The rows are set for
one forward call at a time (`LoRATable.applied`); inside a compiled function the stacks and scales
are the function's inputs too (engine.compiled_step), never constants baked into its trace.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ModelLoadError


@dataclass
class Adapter:
    """One adapter read from disk: its per-module low-rank pairs."""

    name: str
    path: Path
    rank: int
    scale: float
    weights: dict[str, tuple[mx.array, mx.array]]  # module path -> (a [in, rank], b [rank, out])
    digest: bytes = b""  # of its name and files: its prefix-cache identity (engine.adapters)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


@dataclass
class AdapterFiles:
    """An adapter's files as read, before any check: plain numpy, so any thread may read them."""

    config: dict
    tensors: dict[str, np.ndarray]
    digest: bytes


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer (plain or quantized); None for anything else."""
    if isinstance(module, nn.QuantizedLinear):
        out, packed = module.weight.shape
        return packed * 32 // module.bits, out
    if isinstance(module, nn.Linear):
        out, inp = module.weight.shape
        return inp, out
    return None


def _where(name: str, path: Path) -> str:
    return f"adapter {name!r} ({path})"


def read_files(name: str, path: str | Path) -> AdapterFiles:
    """Read an adapter's two files with numpy only (no MLX: a loader thread may call it while the
    engine's thread steps). A ModelLoadError says what cannot be read."""
    path = Path(path)
    try:
        raw_config = (path / "adapter_config.json").read_bytes()
        raw = (path / "adapters.safetensors").read_bytes()
        config = json.loads(raw_config)
        tensors = _safetensors(raw)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{_where(name, path)}: cannot read adapter_config.json and adapters.safetensors: {exc}"
        ) from None
    digest = hashlib.blake2b(name.encode() + b"|" + raw_config + b"|" + raw, digest_size=16).digest()
    return AdapterFiles(config, tensors, digest)


def _header(data: bytes) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets) and where its data start."""
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8 : 8 + n])
    head.pop("__metadata__", None)
    return head, 8 + n


def _safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, as float arrays (bfloat16 widened exactly to float32)."""
    head, base = _header(data)
    out = {}
    for key, info in head.items():
        begin, end = info["data_offsets"]
        kind = info["dtype"]
        if kind not in _NUMPY:
            raise ValueError(f"tensor {key} has dtype {kind} (float32, float16 or bfloat16 expected)")
        array = np.frombuffer(data, _NUMPY[kind], (end - begin) // _NUMPY[kind].itemsize, base + begin)
        if kind == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[key] = array.reshape(info["shape"])
    return out


_NUMPY = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16)}


def adapter_shape(name: str, path: str | Path) -> tuple[int, list[str]]:
    """An adapter's rank and the modules it targets, from adapter_config.json and the
    safetensors header alone (the weights are read when it is first used)."""
    path = Path(path)
    try:
        params = json.loads((path / "adapter_config.json").read_text()).get("lora_parameters") or {}
        with open(path / "adapters.safetensors", "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            head = json.loads(f.read(n))
        rank = int(params["rank"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{_where(name, path)}: cannot read its config and tensor names: {exc!r}") from None
    head.pop("__metadata__", None)
    return rank, sorted({key.rpartition(".")[0] for key in head})


def read_adapter(name: str, path: str | Path, base: nn.Module) -> Adapter:
    """An mlx_lm LoRA adapter, checked against `base`; a ModelLoadError says what is wrong."""
    return check_adapter(name, path, read_files(name, path), base)


def check_adapter(name: str, path: str | Path, files: AdapterFiles, base: nn.Module) -> Adapter:
    """An adapter's files checked against `base` (every module it names is a linear layer of the
    base, with matching shapes), as MLX arrays; a ModelLoadError says what is wrong."""
    path = Path(path)
    where, config = _where(name, path), files.config
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ModelLoadError(f"{where}: fine_tune_type {kind!r} is not served (only lora)")
    params = config.get("lora_parameters") or {}
    if "rank" not in params or "scale" not in params:
        raise ModelLoadError(f"{where}: lora_parameters needs rank and scale")
    modules = dict(base.named_modules())
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in files.tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise ModelLoadError(f"{where}: unexpected tensor {key!r} (a LoRA adapter holds lora_a / lora_b)")
        pairs.setdefault(module, {})[leaf] = value
    weights = {}
    for module, pair in sorted(pairs.items()):
        weights[module] = _checked(where, module, pair, modules.get(module), int(params["rank"]))
    if not weights:
        raise ModelLoadError(f"{where}: adapters.safetensors holds no lora_a / lora_b pair")
    return Adapter(name, path, int(params["rank"]), float(params["scale"]), weights, files.digest)


def _checked(where: str, module: str, pair: dict, target, rank: int) -> tuple[mx.array, mx.array]:
    if "lora_a" not in pair or "lora_b" not in pair:
        raise ModelLoadError(f"{where}: {module} has only {sorted(pair)}")
    if isinstance(target, BatchedLoRALinear):
        target = target.base
    dims = linear_dims(target) if target is not None else None
    if dims is None:
        raise ModelLoadError(f"{where}: {module} is not a linear layer of the base model")
    a, b = pair["lora_a"], pair["lora_b"]
    if a.shape != (dims[0], rank) or b.shape != (rank, dims[1]):
        raise ModelLoadError(
            f"{where}: {module} has lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)}; the base layer "
            f"needs ({dims[0]}, {rank}) and ({rank}, {dims[1]})"
        )
    return mx.array(a), mx.array(b)


class LoRATable:
    """The resident adapters of one base model, stacked per module, and this forward call's rows."""

    def __init__(self, base: nn.Module, slots: int):
        self.base = base
        self.slots = slots  # resident adapters at most, plus slot 0 (none)
        self.rank = 0
        self.adapters: list[Adapter | None] = [None] * (slots + 1)
        self.stacks: dict[str, tuple[mx.array, mx.array]] = {}  # module -> ([S, in, r], [S, r, out])
        self.scales = mx.zeros((slots + 1,))
        self.rows: mx.array | None = None  # [B] each row's slot for the call at hand; None: base only

    def attach(self, modules: list[str], rank: int) -> None:
        """Wrap the base's `modules` (linear layers) for adapters of up to `rank`; once per base."""
        named = dict(self.base.named_modules())
        self.rank = rank
        for path in modules:
            if isinstance(named.get(path), BatchedLoRALinear):
                raise ModelLoadError(f"{path} already serves adapters (a model object shared by two engines?)")
            dims = linear_dims(named[path]) if path in named else None
            if dims is None:
                raise ModelLoadError(f"adapters target {path}, which is not a linear layer of the base model")
            inp, out = dims
            self.stacks[path] = (mx.zeros((self.slots + 1, inp, rank)), mx.zeros((self.slots + 1, rank, out)))
            parent, _, leaf = path.rpartition(".")
            named[parent].update_modules({leaf: BatchedLoRALinear(named[path], self, path)})
        mx.eval(self.scales, *self.arrays())

    @property
    def nbytes(self) -> int:
        """Bytes of the stacks: every slot's, resident or not (they are allocated once)."""
        return self.scales.nbytes + sum(a.nbytes + b.nbytes for a, b in self.stacks.values())

    def put(self, slot: int, adapter: Adapter) -> None:
        """`adapter` into `slot` (1..slots), replacing what was there; its rank is padded with zeros."""
        for path, (a_stack, b_stack) in self.stacks.items():
            a, b = adapter.weights.get(path, (None, None))
            a_new = mx.zeros(a_stack.shape[1:]) if a is None else _pad(a, a_stack.shape[1:])
            b_new = mx.zeros(b_stack.shape[1:]) if b is None else _pad(b, b_stack.shape[1:])
            a_stack[slot] = a_new.astype(a_stack.dtype)
            b_stack[slot] = b_new.astype(b_stack.dtype)
        self.scales[slot] = adapter.scale
        self.adapters[slot] = adapter
        mx.eval(self.scales, *self.arrays())

    def use(self, slots: list[int]) -> None:
        """The rows of the next forward call, by slot (0: the base alone)."""
        self.rows = self.slot_array(slots)

    @staticmethod
    def slot_array(slots: list[int]) -> mx.array | None:
        """The rows' slots as the layers take them; None when no row has an adapter."""
        return mx.array(slots, dtype=mx.uint32) if any(slots) else None

    def arrays(self) -> list[mx.array]:
        """The stacks, flat and in a fixed order: a compiled step's inputs (engine.compiled_step)."""
        return [x for pair in self.stacks.values() for x in pair]

    @contextmanager
    def applied(self, rows: mx.array | None, inputs: list[mx.array] | None = None):
        """The layers use `rows` (and, inside a compiled function, `inputs`: [scales, *arrays()],
        the traced stand-ins of the stacks) for the calls in the block; the base alone after."""
        saved = self.rows, self.stacks, self.scales
        self.rows = rows
        if inputs is not None:
            self.scales = inputs[0]
            flat = iter(inputs[1:])
            self.stacks = {path: (next(flat), next(flat)) for path in saved[1]}
        try:
            yield
        finally:
            self.rows, self.stacks, self.scales = saved


def _pad(x: mx.array, shape: tuple[int, int]) -> mx.array:
    """A lower-rank pair into the table's rank: zero rows / columns change nothing."""
    return mx.pad(x, [(0, shape[0] - x.shape[0]), (0, shape[1] - x.shape[1])])


class BatchedLoRALinear(nn.Module):
    """A base linear layer plus, per row, its adapter's low-rank update (slot 0: none)."""

    def __init__(self, base: nn.Module, table: LoRATable, path: str):
        super().__init__()
        self.base = base
        self._table, self._path = table, path  # not parameters: the table owns the stacks

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        rows = self._table.rows
        if rows is None:
            return y
        a, b = self._table.stacks[self._path]
        lead = x.shape[:-2]  # [B] (rows of L tokens each)
        h = mx.gather_mm(x, a, rhs_indices=rows.reshape(lead))
        delta = mx.gather_mm(h, b, rhs_indices=rows.reshape(lead))
        scale = self._table.scales[rows].reshape(*lead, 1, 1)
        return y + (scale * delta).astype(y.dtype)
