#!/usr/bin/env bash
# Runs ON the lent GPU machine: the conformance matrix's checks (tests/engine/test_families.py:
# a batch of four prompts of different lengths, a repeat and a continuation, against mlx_lm's own
# one-at-a-time greedy decode) for every family, on MLX's CUDA backend, without pytest (the device
# has none). Wheels and calls as benchmarks/gpu/hybrid-on-device.sh (carry .accel/p1, p2, then p3).
set -euo pipefail
code=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p /tmp/accel && cp "$code"/.accel/p*/part_* /tmp/accel/ 2>/dev/null || true
if [ ! -d /tmp/site/mlx_lm ]; then
  cat /tmp/accel/part_* | tar -C /tmp/accel -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/accel/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$code PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 ORCHARD_CACHE=/tmp/orchard-cache
cd "$code"
python3 - <<'PY'
import asyncio, json, sys, time
import mlx.core as mx
sys.modules.setdefault("pytest", type(sys)("pytest"))  # test_families imports it for fixtures only
import types
pt = sys.modules["pytest"]
pt.fixture = lambda *a, **k: (lambda f: f)
pt.mark = types.SimpleNamespace(slow=None)
from tests.engine import test_families as tf
from engine.engine import AsyncEngine

async def family(name):
    model = tf.engine.engine.load_model(f"synthetic:{name}").model
    prompts, repeat = tf.make_prompts(name)
    solo = [tf.solo_greedy(model, p) for p in prompts]
    eng = AsyncEngine(f"synthetic:{name}", tf.CONFIG)
    try:
        got = await asyncio.gather(*(tf.generate(eng, p) for p in prompts))
        batch_ok = [g == s.tokens for (g, _), s in zip(got, solo)]
        where = [next((i for i, (a, b) in enumerate(zip(g, s.tokens)) if a != b), None) for (g, _), s in zip(got, solo)]
        margins = [round(s.margins[i], 5) for i, s in zip(where, solo) if i is not None]
        cold, _ = await tf.generate(eng, repeat)
        hit, usage = await tf.generate(eng, repeat)
        ref = tf.solo_greedy(model, repeat).tokens
        stats = eng.stats()
        return {"family": name, "batch_exact": sum(batch_ok), "of": len(batch_ok), "solo_margin_where_differs": margins,
                "min_solo_margin": round(min(min(s.margins) for s in solo), 5), "repeat_exact": hit == ref == cold,
                "cached": usage.cached_tokens, "path": stats["cache"].get("path"), "batched": stats.get("batched"),
                "batch_peak": stats.get("batch_peak"), "check": stats.get("batch_check")}
    finally:
        eng.shutdown()

print("device", mx.default_device(), file=sys.stderr)
rows = []
import os
for name in os.environ.get("FAMILIES", " ".join(sorted(tf.FAMILIES))).split():
    t = time.time()
    try:
        rows.append(asyncio.run(family(name)) | {"s": round(time.time() - t, 1)})
    except Exception as exc:
        rows.append({"family": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
    print(json.dumps(rows[-1]), flush=True)
bad = [r for r in rows if "error" in r or r["batch_exact"] != r["of"] or not r["repeat_exact"]]
print(f"{len(rows) - len(bad)} of {len(rows)} families exact on {mx.default_device()}; not: {[r['family'] for r in bad]}")
PY
