#!/usr/bin/env bash
# Runs ON the lent GPU machine: `python -m benchmarks vision` on synthetic:gemma-3-4b-vlm (gemma-3-4b-it's
# real shapes and vocabulary, random bf16 weights), with the wheels accel-wheels.sh made (.accel/p1..pN in
# the main checkout, ignored by git) plus the vision extra's wheels in .accel/vx (mlx-vlm and what its
# gemma3 path imports that the machine lacks: pillow, sentencepiece, httpx2, httpcore2, truststore), and
# this checkout's own tracked files. Options given to this script go to the suite (e.g. --rounds 5).
#
# Make .accel/vx, from the main checkout:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform any -d .accel/vx \
#     mlx-vlm==0.7.10 pillow==13.0.0 sentencepiece==0.2.3 httpx2==2.17.0 httpcore2==2.17.0 truststore
# One device call per part, chained (the machine stays warm ~30 s between calls):
#   carry [".accel/p1"]: mkdir -p /tmp/accel && cp .accel/p1/* /tmp/accel/       (the same for p2, p3)
#   carry [".accel/vx"]: bash benchmarks/gpu/vision-on-device.sh
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
if [ ! -d /tmp/site/mlx_vlm ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$code"/.accel/vx/*.whl
fi
export PYTHONPATH=/tmp/site:$code PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 ORCHARD_CACHE=/tmp/orchard-cache
cd "$code"
python3 -c 'import mlx.core as mx, mlx_lm, mlx_vlm, engine.engine, engine.vision.encoder
print("mlx", mx.__version__, mx.default_device(), "mlx_lm", mlx_lm.__version__, "mlx_vlm", mlx_vlm.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out=${OUT:-/tmp/vision-out}
mkdir -p "$out"
python3 -m benchmarks vision --model synthetic:gemma-3-4b-vlm --out "$out/vision.json" "$@" 2>&1 | tee "$out/vision.log"
