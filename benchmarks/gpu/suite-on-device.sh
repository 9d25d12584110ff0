#!/usr/bin/env bash
# Runs ON the lent GPU machine: `python -m benchmarks SUITE [OPTIONS]` with the wheels accel-wheels.sh made
# (.accel/p1..pN in the main checkout, ignored by git), the vision extra's wheels when .accel/vx is carried
# (vision-on-device.sh says how to make it), and this checkout's tracked files; the suite's output goes
# under $OUT (give it `--out "$OUT/x.json"` or `--json-out ...` as the suite names it). The
# <suite>-on-device.sh scripts beside it are this with each suite's options.
#   carry [".accel/p1"]: mkdir -p /tmp/accel && cp .accel/p1/* /tmp/accel/       (the same for p2)
#   carry [".accel/p3"]: bash benchmarks/gpu/suite-on-device.sh diskcache --model synthetic:qwen3-0.6b-8bit ...
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
if [ -d "$code/.accel/vx" ] && [ ! -d /tmp/site/mlx_vlm ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$code"/.accel/vx/*.whl
fi
export PYTHONPATH=/tmp/site:$code PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 ORCHARD_CACHE=/tmp/orchard-cache
cd "$code"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m benchmarks "$@"
