"""The compiled decode step alone, on whatever device MLX runs: what its mask and its column write cost.

    python -m benchmarks.lab.bench_decode_step --model synthetic:qwen3-0.6b-8bit --batches 1 5 16   # GPU
    python -m benchmarks.lab.bench_decode_step --kernels   # + device kernels a step (torch.profiler, CUDA)

Each variant runs in a bare pipelined loop (step k+1 enqueued before token k is read, one host sync
a step), rounds interleaved so drift hits all alike, over full working copies of `--cols` keys:
- `slice`: our step (engine.compiled_step) writing its KV column with a slice update (Metal, CPU).
- `select`: our step writing it with a select over the copy (CUDA's default, see that module).
- `unmasked`: `slice` without the attention mask; right only when every row sees every column.
- `mlx_lm`: the model over mlx_lm's own KVCache, no mask, uncompiled: its single-length decode path.

A batch of rows of different lengths needs a mask at every decode step. MLX's CUDA backend (0.32)
has no fused decode kernel for an array mask (its vector kernel and cuDNN's decode path both require
none), so a masked step falls back to matmul + softmax + matmul, several kernels a layer instead of
one; on a host-bound step every kernel costs host time. Also timed: the attention op alone, masked
and not. `--kernels` adds, per variant, the CUDA kernels a step and their device time.
Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import collections
import time

import mlx.core as mx

from engine.compiled_step import _ColumnCache, _decode_step

from ..report import emit


class _Unmasked(_ColumnCache):
    """The same working copy, without a mask: right only when every row sees every column."""

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs):
        return None


def _unmasked_step(model):
    def forward(inputs, col, pad, ks, vs):
        caches = [_Unmasked(k, v, col, pad) for k, v in zip(ks, vs)]
        logits = model(inputs[:, None], cache=caches)[:, -1, :]
        return logits, [c.k for c in caches], [c.v for c in caches]

    return mx.compile(forward)


def _copies(model, rows: int, cols: int):
    args = model.args
    heads, dim = (
        args.num_key_value_heads,
        getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads,
    )
    dtype = model.model.norm.weight.dtype  # the activations' dtype (bf16 for mlx-community checkpoints)
    shape = (rows, heads, cols, dim)
    ks = [mx.random.normal(shape).astype(dtype) for _ in model.layers]
    vs = [mx.random.normal(shape).astype(dtype) for _ in model.layers]
    mx.eval(ks, vs)
    return ks, vs


def our_step(model, step, rows: int, cols: int):
    """One decode step of `step` (a compiled working-copy step) a call; returns what to evaluate."""
    ks, vs = _copies(model, rows, cols)
    state = {"tokens": mx.zeros((rows,), mx.int32), "ks": ks, "vs": vs}
    col, pad = mx.array(cols - 1, dtype=mx.int32), mx.zeros((rows,), mx.int32)

    def one():
        logits, state["ks"], state["vs"] = step(state["tokens"], col, pad, state["ks"], state["vs"])
        state["tokens"] = mx.argmax(logits, axis=-1).astype(mx.int32)
        return [state["tokens"], *state["ks"], *state["vs"]]

    return one


def mlx_lm_step(model, rows: int, cols: int):
    """The model over mlx_lm's KVCache, every row `cols - 8` long (no mask), its offset held there."""
    from mlx_lm.models.cache import KVCache

    ks, vs = _copies(model, rows, cols)
    caches = []
    for k, v in zip(ks, vs):
        cache = KVCache()
        cache.keys, cache.values, cache.offset = k, v, cols - 8
        caches.append(cache)
    state = {"tokens": mx.zeros((rows,), mx.int32)}

    def one():
        for cache in caches:
            cache.offset = cols - 8  # stay inside the buffer: every step the same shapes
        logits = model(state["tokens"][:, None], cache=caches)[:, -1, :]
        state["tokens"] = mx.argmax(logits, axis=-1).astype(mx.int32)
        return [state["tokens"], *(c.keys for c in caches), *(c.values for c in caches)]

    return one


def pipelined(one, rows: int, steps: int) -> float:
    """Tokens a second of `steps` calls of `one`, each enqueued before the previous tokens are read."""
    pending, start = None, time.perf_counter()
    for _ in range(steps):
        out = one()
        mx.async_eval(*out)
        if pending is not None:
            pending.tolist()
        pending = out[0]
    pending.tolist()
    return rows * steps / (time.perf_counter() - start)


def profile_kernels():
    """A torch.profiler context that records CUDA activity: MLX's kernels too, from any thread."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CUDA])


def kernel_summary(prof, steps: int) -> dict:
    """CUDA kernels a step and their device time, from a finished `profile_kernels()`."""
    import torch

    count, device_us = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count[event.name[:60]] += 1
            device_us[event.name[:60]] += event.device_time
    top = [
        {"kernel": k, "per_step": round(count[k] / steps, 1), "us_per_step": round(t / steps, 1)}
        for k, t in device_us.most_common(6)
    ]
    return {
        "kernels_per_step": round(sum(count.values()) / steps),
        "device_ms_per_step": round(sum(device_us.values()) / steps / 1000, 2),
        "top": top,
    }


def kernels(one, rows: int, steps: int) -> dict:
    """CUDA kernels a step of `one` in the pipelined loop, and their device time."""
    with profile_kernels() as prof:
        pipelined(one, rows, steps)
    return kernel_summary(prof, steps)


def logits_agree(model, masked, unmasked, rows: int, cols: int) -> dict:
    """How far the two variants' logits are apart (bf16 kernels differ in rounding, not in result)."""
    ks, vs = _copies(model, rows, cols)
    args = (mx.arange(rows, dtype=mx.int32), mx.array(cols - 1, dtype=mx.int32), mx.zeros((rows,), mx.int32), ks, vs)
    a, b = (f(*args)[0].astype(mx.float32) for f in (masked, unmasked))
    rel = (mx.abs(a - b).max() / mx.abs(a).max()).item()
    same = (mx.argmax(a, axis=-1) == mx.argmax(b, axis=-1)).mean().item()
    return {"max_rel_diff": round(rel, 5), "same_argmax": round(same, 3)}


def time_sdpa(model, rows: int, cols: int, masked: bool, iters: int) -> float:
    """Microseconds per attention call (a model's worth of layers per iteration)."""
    ks, vs = _copies(model, rows, cols)
    args = model.args
    q = mx.random.normal((rows, args.num_attention_heads, 1, ks[0].shape[-1])).astype(ks[0].dtype)
    mask = (mx.arange(cols)[None, :] >= mx.zeros((rows, 1), mx.int32))[:, None, None, :] if masked else None
    scale = ks[0].shape[-1] ** -0.5
    mx.eval(q, mask) if masked else mx.eval(q)

    def one_iter():
        return [mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask) for k, v in zip(ks, vs)]

    for _ in range(5):
        mx.eval(one_iter())
    start = time.perf_counter()
    for _ in range(iters):
        mx.eval(one_iter())
    return (time.perf_counter() - start) / (iters * len(ks)) * 1e6


VARIANTS = ("slice", "select", "unmasked", "mlx_lm")


def run(args) -> dict:
    from engine.loading.loader import load_model

    model = load_model(args.model).model
    steps = {
        "slice": mx.compile(_decode_step(model, False, False)),
        "select": mx.compile(_decode_step(model, True, False)),
        "unmasked": _unmasked_step(model),
    }
    rows = []
    for batch in args.batches:
        row = {
            "batch": batch,
            "cols": args.cols,
            **logits_agree(model, steps["slice"], steps["unmasked"], batch, args.cols),
        }
        ones = {name: our_step(model, step, batch, args.cols) for name, step in steps.items()}
        ones["mlx_lm"] = mlx_lm_step(model, batch, args.cols)
        for one in ones.values():
            pipelined(one, batch, args.warmup)
        for _ in range(args.rounds):  # interleaved, so drift hits every variant alike
            for name, one in ones.items():
                row.setdefault(f"{name}_tok_s", []).append(round(pipelined(one, batch, args.steps), 1))
            for name, flag in (("masked", True), ("unmasked", False)):
                row.setdefault(f"sdpa_{name}_us", []).append(round(time_sdpa(model, batch, args.cols, flag, 20), 1))
        if args.kernels:
            row["kernels"] = {name: kernels(one, batch, 64) for name, one in ones.items()}
        print(f"batch {batch}: " + ", ".join(f"{n} {row[n + '_tok_s']}" for n in ones), flush=True)
        rows.append(row)
    return {
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "model": args.model,
        "cols": args.cols,
        "steps": args.steps,
        "rows": rows,
    }


def table(result: dict) -> str:
    span = lambda xs: f"{min(xs)}–{max(xs)}" if len(xs) > 1 else f"{xs[0]}"  # noqa: E731 - a one-line local helper
    lines = [
        f"device {result['device']}, mlx {result['mlx']}, {result['model']}, {result['cols']} keys; "
        "ranges over the rounds",
        "",
        "| batch |" + "".join(f" {v} tok/s |" for v in VARIANTS) + " SDPA µs masked | unmasked "
        "| logits max rel. diff (unmasked) | same argmax |",
        "|---:" * (len(VARIANTS) + 5) + "|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} |"
            + "".join(f" {span(r[v + '_tok_s'])} |" for v in VARIANTS)
            + f" {span(r['sdpa_masked_us'])} | {span(r['sdpa_unmasked_us'])} | {r['max_rel_diff']} "
            f"| {r['same_argmax']} |"
        )
    if "kernels" in result["rows"][0]:
        lines += [
            "",
            "| batch |" + "".join(f" {v} kernels/step (device ms) |" for v in VARIANTS),
            "|---:" * (len(VARIANTS) + 1) + "|",
        ]
        for r in result["rows"]:
            k = r["kernels"]
            lines.append(
                f"| {r['batch']} |"
                + "".join(f" {k[v]['kernels_per_step']} ({k[v]['device_ms_per_step']}) |" for v in VARIANTS)
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="synthetic:qwen3-0.6b-8bit")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 5, 16])
    parser.add_argument("--cols", type=int, default=256, help="keys each row attends to (the copy's capacity)")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernels", action="store_true", help="also count CUDA kernels a step (needs torch)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    result = run(args)
    emit(result, table(result), args.json_out)


if __name__ == "__main__":
    main()
