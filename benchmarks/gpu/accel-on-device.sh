#!/usr/bin/env bash
# Runs ON the lent GPU machine, in the call that carries the last part (see accel-wheels.sh): joins the
# parts already copied to /tmp/accel, installs every wheel into /tmp/site (offline, --no-deps), checks
# the imports, then runs `python -m benchmarks accel "$@"` from the carried checkout, its JSON, logs and
# profiles under $OUT. With no arguments: install and check only.
set -euo pipefail
code=$(cd "$(dirname "$0")/../.." && pwd)
parts=$(cd "$code/.." && pwd)
mkdir -p /tmp/accel && cp "$parts"/p*/part_* /tmp/accel/ 2>/dev/null || true
if [ ! -d /tmp/site/ray ]; then
  cat /tmp/accel/part_* | tar -C /tmp/accel -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/accel/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$code PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
cd "$code"
python3 -c 'import mlx.core as mx, ray, ray.serve, fastapi, pydantic, llguidance, mlx_lm, deployments.app, engine.engine
print("mlx", mx.__version__, mx.default_device(), "ray", ray.__version__, "mlx_lm", mlx_lm.__version__)'
python3 -c 'import vllm_mlx.server' || echo "vllm_mlx.server does not import (the suite reports why)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
[ $# -gt 0 ] || exit 0
out=${OUT:-/tmp/accel-out}
mkdir -p "$out"
status=0
python3 -m benchmarks accel --workdir /tmp/accel-run --out "$out/accel.json" "$@" || status=$?
cp /tmp/accel-run/*.log "$out/" 2>/dev/null || true
tail -n 30 /tmp/ray/session_latest/logs/serve/*.log > "$out/ray_serve_tail.txt" 2>/dev/null || true
[ ! -d /tmp/accel-run/profile ] || tar -C /tmp/accel-run -czf "$out/profile.tar.gz" profile
ls -d /tmp/accel-run/hops-* >/dev/null 2>&1 && tar -C /tmp/accel-run -czf "$out/hops.tar.gz" $(cd /tmp/accel-run && ls -d hops-*)
exit $status
