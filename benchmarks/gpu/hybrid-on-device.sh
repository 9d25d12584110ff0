#!/usr/bin/env bash
# Runs ON the lent GPU machine: `python -m benchmarks hybrid` on synthetic:qwen3.5-0.8b-8bit, with the
# wheels accel-wheels.sh made (.accel/p1..pN in the main checkout, ignored by git) and this checkout's
# own tracked files (not .accel/code, which is a copy from when the wheels were made). Joins the parts
# already copied to /tmp/accel, installs every wheel into /tmp/site (offline, --no-deps), checks the
# imports, then runs the suite; its JSON and log go under $OUT. Options given to this script go to the
# suite after the defaults (e.g. --rounds 3).
#
# One device call per part, chained (the machine stays warm ~30 s between calls), from the main checkout:
#   carry [".accel/p1"]: mkdir -p /tmp/accel && cp .accel/p1/* /tmp/accel/       (the same for p2)
#   carry [".accel/p3"]: bash benchmarks/gpu/hybrid-on-device.sh
set -euo pipefail
code=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p /tmp/accel && cp "$code"/.accel/p*/part_* /tmp/accel/ 2>/dev/null || true
if [ ! -d /tmp/site/mlx_lm ]; then
  if ! cat /tmp/accel/part_* | tar -C /tmp/accel -xf -; then
    echo "the wheel parts in /tmp/accel are incomplete ($(ls /tmp/accel)): the machine went cold between calls; make the calls again" >&2
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/accel/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$code PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 ORCHARD_CACHE=/tmp/orchard-cache
cd "$code"
python3 -c 'import mlx.core as mx, mlx_lm, pydantic, llguidance, engine.engine
print("mlx", mx.__version__, mx.default_device(), "mlx_lm", mlx_lm.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out=${OUT:-/tmp/hybrid-out}
mkdir -p "$out"
python3 -m benchmarks hybrid --model synthetic:qwen3.5-0.8b-8bit --out "$out/hybrid.json" "$@" 2>&1 | tee "$out/hybrid.log"
