#!/usr/bin/env bash
# Runs ON the lent GPU machine: `python -m benchmarks kvquant --parts capacity throughput` on
# synthetic:qwen3-0.6b-8bit (Qwen3-0.6B's shapes, 8-bit weights with bf16 scales, random values), with the
# wheels accel-wheels.sh made (.accel/p1..pN, ignored by git) and this checkout's tracked files. Options
# given to this script go to the suite after the defaults (e.g. --bits 16 8 --clients 16 64).
#   carry [".accel/p1"]: mkdir -p /tmp/accel && cp .accel/p1/* /tmp/accel/       (the same for p2)
#   carry [".accel/p3"]: bash benchmarks/gpu/kvquant-on-device.sh --bits 16 8 4
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out=${OUT:-/tmp/kvquant-out}
mkdir -p "$out"
python3 -m benchmarks kvquant --models synthetic:qwen3-0.6b-8bit --parts capacity throughput --cache-mb 512 \
  --clients 16 64 --max-tokens 128 --json-out "$out/kvquant.json" "$@" 2>&1 | tee "$out/kvquant.log"
