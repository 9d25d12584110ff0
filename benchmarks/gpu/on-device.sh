# Sourced by the on-device scripts that run after accel-on-device.sh installed the wheels into
# /tmp/site: `. "$(dirname "$0")/on-device.sh" NAME`. Sets `code` (the carried checkout, also the
# working directory), the environment (PYTHONPATH, PATH, unbuffered output, no Ray usage stats) and
# `out` ($OUT, or /tmp/NAME-out when run by hand), created; and `accel_stage`.
code=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH=/tmp/site:$code PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
cd "$code" || exit 1
out=${OUT:-/tmp/$1-out}
mkdir -p "$out"

accel_stage() {  # WORKDIR ARGS...: `python -m benchmarks accel ARGS` when ARGS are given, time-boxed by ACCEL_S
  local workdir=$1
  shift
  [ $# -gt 0 ] || return 0
  echo "== accel $*"
  timeout "${ACCEL_S:-300}" python3 -m benchmarks accel --workdir "$workdir" --out "$out/accel.json" "$@" \
    >"$out/accel.log" 2>&1
  echo "exit $?"
  grep -A 12 -E '^\| (clients|target)' "$out/accel.log" | cut -c1-300
}
