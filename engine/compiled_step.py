"""The decode step as one compiled MLX function over fixed-size working copies.

A decode step through mlx_lm's model is built by Python every time: each of the model's layers
makes its attention, MLP and cache calls, ~20 MLX ops a layer, and on a fast device the host
building that graph is the limit (the step is host-bound). `mx.compile` traces the step once per
input shape and replays the recorded graph from then on, with its element-wise ops fused, so a
step costs the host one call instead of a model's worth of Python.

A trace is only reused while shapes stay the same, so the compiled step reads and writes the
*whole* working copy of each layer (`[B, H, cap, D]`, engine.kv.working_copy) and takes the column
it writes, and each row's left padding, as arrays: a shape changes only when the batch's rows
change or its copies grow (`engine.kv.working_copy.capacity`), and each such shape is traced once
and kept. Attention then reads the copy's empty columns too, hidden by the mask like the
padding; that is why `cap` grows in small steps (at most ~1/8 of the context).

The model sees, per layer, a `_ColumnCache`: mlx_lm's cache protocol (`offset`,
`update_and_fetch`, `make_mask`) over the copy's arrays. The column is written with a slice update
at a start given as an array, except on CUDA: there MLX (0.32) launches that update with a thread per
element of the *whole copy*, not of the column (`copy_general_dynamic` sizes its grid by the output),
plus a kernel for the offset, so one select over the copy (`mx.where` with the column's one-hot) is
cheaper (docs/lab-notebook.md, *Kernels per step on the H200*). The loop's bookkeeping (blocks, the
geometry, the rows' lengths) happens outside the compiled function, once a step
(`PagedContext.decode_copies` before it, `PagedContext.commit_column` after).

With quantized blocks (`EngineConfig.kv_bits`, engine.kv.quantized_storage) the step quantizes its
column, writes the dequantized values into the copies (what the blocks will hold, so attention
reads now what a later step or a cache hit reads) and returns the quantized parts, which
`commit_column` writes to the blocks.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

from .kv.working_copy import visible


class _ColumnCache(_BaseCache):
    """One layer's working copy inside the trace: this step writes column `col` of every row
    (through `onehot` [1, 1, cap, 1], the column's one-hot, when given)."""

    def __init__(
        self, k: mx.array, v: mx.array, col: mx.array, pad: mx.array, onehot: mx.array | None, grouped: bool, quant
    ):
        self.k, self.v, self.col, self.pad, self.onehot, self.grouped = k, v, col, pad, onehot, grouped
        self.quant = quant
        self.parts = None  # the column's quantized K and V parts (quantized blocks)
        if onehot is None:
            self._start = mx.concatenate([mx.zeros((2,), mx.int32), col.reshape(1), mx.zeros((1,), mx.int32)])

    @property
    def offset(self) -> mx.array:
        """[B] each row's position of this step's token (RoPE)."""
        return self.col - self.pad

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.quant is not None:
            (keys, kparts), (values, vparts) = self.quant.round_trip(keys), self.quant.round_trip(values)
            self.parts = (kparts, vparts)
        if self.onehot is not None:
            self.k = mx.where(self.onehot, keys.astype(self.k.dtype), self.k)
            self.v = mx.where(self.onehot, values.astype(self.v.dtype), self.v)
        else:
            self.k = mx.slice_update(self.k, keys, self._start, (0, 1, 2, 3))
            self.v = mx.slice_update(self.v, values, self._start, (0, 1, 2, 3))
        return self.k, self.v

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs) -> mx.array:
        """[B, 1, 1, cap] over the whole copy: its empty columns are hidden like the padding
        ([B, 1, 1, 1, cap] for attention that groups queries in five dimensions: engine.kv.layout)."""
        mask = visible(mx.arange(self.k.shape[2]), self.col, self.pad, window_size)
        return mask[:, :, None] if self.grouped else mask

    @property
    def state(self):
        return self.k, self.v


def _on_cuda() -> bool:
    cuda = getattr(mx, "cuda", None)  # absent from some builds (engine.loading.cpu_fast_path does the same)
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


def select_column(column_write: str | None = None) -> bool:
    """Whether the step writes its column with a select: `column_write` ("slice" / "select",
    `EngineConfig.decode_column_write`), or when None, on CUDA (see the module's docstring)."""
    if column_write is not None:
        return column_write == "select"
    return _on_cuda()


def eager_unpadded(unpadded_decode: str | None = None) -> bool:
    """Whether a decode batch with no padding skips the compiled step: `unpadded_decode` ("eager" /
    "compiled", `EngineConfig.unpadded_decode`), or when None, on CUDA. Such a batch needs no mask
    (`Geometry.sees_all`), and MLX's CUDA backend runs unmasked decode attention as one fused vector
    kernel but a masked one as ~5 unfused kernels a layer; the compiled step always masks (it reads
    its copy's empty columns), so there the eager step is the faster one (docs/lab-notebook.md,
    *Unmasked when nothing is padded*)."""
    if unpadded_decode is not None:
        return unpadded_decode == "eager"
    return _on_cuda()


def _decode_step(model, select: bool, grouped: bool, quant, lora=None):
    """The function to compile: a closure over the model only (no reference cycle through the
    CompiledDecode, so its traces go when it goes, on the thread that drops it). With `lora` (the
    engine.lora.LoRATable), the step of a batch where some row has an adapter: its last input is
    [rows' slots, scales, *stacks], so the trace reads the slots and the adapters' weights as
    arrays (a new mix of rows, or an adapter loaded into a slot, needs no new trace)."""

    def forward(inputs: mx.array, col: mx.array, pad: mx.array, ks: list[mx.array], vs: list[mx.array]):
        onehot = (mx.arange(ks[0].shape[2]) == col)[None, None, :, None] if select else None
        caches = [_ColumnCache(k, v, col, pad, onehot, grouped, quant) for k, v in zip(ks, vs)]
        logits = model(inputs[:, None], cache=caches)[:, -1, :]
        out = logits, [c.k for c in caches], [c.v for c in caches]
        return out if quant is None else (*out, [c.parts for c in caches])

    if lora is None:
        return forward

    def forward_lora(inputs, col, pad, ks, vs, adapters: list[mx.array]):
        with lora.applied(adapters[0], adapters[1:]):
            return forward(inputs, col, pad, ks, vs)

    return forward_lora


class CompiledDecode:
    """`model`'s one-token step over working copies, compiled (one trace per batch shape).

    A shape is traced at its `compile_after`-th step; before that the same function runs
    uncompiled. A trace costs many steps' time on a GPU (the graph, then new fused kernels), and
    a burst that reaches the engine spread out over a few steps makes a new shape at each of them,
    each used for a step or two while the rows join; the batch they end in stays for many steps
    and is traced then (docs/lab-notebook.md, *Where a burst's time goes through `serve run`*).

    MLX keeps every trace of a compiled function until the function goes, so past `max_traces`
    shapes the function is made again (its traces dropped) rather than grow without bound.
    `quant`: the blocks are stored quantized (engine.kv.quantized_storage.KVQuant)."""

    max_traces = 256
    compile_after = 3

    def __init__(self, model, column_write: str | None = None, grouped_mask: bool = False, quant=None, lora=None):
        self.model = model
        self.select = select_column(column_write)
        self.grouped = grouped_mask
        self.quant = quant
        self.lora = lora  # engine.lora.LoRATable: batches with adapter rows take the LoRA variant
        self._eager = self._make(False)  # the same step, uncompiled
        self._step = mx.compile(self._make(False))
        # the LoRA variant: made (and traced) only once a batch has a row with an adapter
        self._lora_eager = self._lora_step = None
        self.steps = 0  # every call, compiled or not
        self.eager_steps = 0  # calls that ran uncompiled (their shape not traced yet)
        self.shapes: set[tuple] = set()  # (rows, capacity[, "lora"]) traced so far
        self.traces = 0  # shapes traced in all (`shapes` is cleared past max_traces; this is not)
        self._untraced: dict[tuple[int, int], int] = {}  # steps run so far by shapes not traced yet

    def _make(self, lora: bool):
        return _decode_step(self.model, self.select, self.grouped, self.quant, self.lora if lora else None)

    def __call__(self, inputs: mx.array, col: int, pad: mx.array, ks: list[mx.array], vs: list[mx.array], rows=None):
        """Logits `[B, vocab]` for `inputs` `[B]` written at column `col`; the copies' new K and V
        (and with `quant`, per layer the column's quantized (K, V) parts). `rows`: each row's
        adapter slot (engine.lora), None when no row has one: the plain step. The LoRA variant is
        its own compiled function, traced per shape as the plain one ((rows, capacity, "lora"))."""
        self.steps += 1
        args = (inputs, mx.array(col, dtype=mx.int32), pad, ks, vs)
        shape = (ks[0].shape[0], ks[0].shape[2])
        if rows is None:
            return self._run(shape, False, args)
        if self._lora_step is None:
            self._lora_eager, self._lora_step = self._make(True), mx.compile(self._make(True))
        return self._run((*shape, "lora"), True, (*args, [rows, self.lora.scales, *self.lora.arrays()]))

    def _run(self, shape: tuple, lora: bool, args: tuple):
        if shape not in self.shapes:
            seen = self._untraced.pop(shape, 0) + 1
            if seen < self.compile_after:
                if len(self._untraced) >= self.max_traces:
                    self._untraced.clear()
                self._untraced[shape] = seen
                self.eager_steps += 1
                return (self._lora_eager if lora else self._eager)(*args)
            if len(self.shapes) >= self.max_traces:  # every trace goes: both functions made again
                self._step = mx.compile(self._make(False))
                self._lora_step = mx.compile(self._make(True)) if self._lora_step is not None else None
                self.shapes.clear()
            self.traces += 1
            self.shapes.add(shape)
        return (self._lora_step if lora else self._step)(*args)
