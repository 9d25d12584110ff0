#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh has installed the wheels into /tmp/site:
# `python -m benchmarks accel` from two checkouts, alternating A B A B ..., so that a change is
# measured against the tree before it on one card, with the host's drift spread over both.
#   A: $BASE (a copy of the tree before the change: accel-wheels.sh leaves one in .accel/code)
#   B: this checkout
# Usage: BASE=.accel/code PAIRS=2 bash benchmarks/gpu/ab-on-device.sh [accel options]
# Each run's JSON is $OUT/{a,b}N.json; the end prints every run's serve run / engine table.
set -uo pipefail
code=$(cd "$(dirname "$0")/../.." && pwd)
base=$(cd "${BASE:-$code/.accel/code}" && pwd)
out=${OUT:-/tmp/ab-out}
mkdir -p "$out"
export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
for n in $(seq 1 "${PAIRS:-2}"); do
  for arm in a b; do
    tree=$([ $arm = a ] && echo "$base" || echo "$code")
    pkill -x haproxy 2>/dev/null
    (cd "$tree" && PYTHONPATH=/tmp/site:$tree python3 -m benchmarks accel --workdir "/tmp/ab-$arm$n" \
      --out "$out/$arm$n.json" "$@" > "$out/$arm$n.log" 2>&1)
    echo "== $arm$n ($tree) exit $?"
    grep -A 8 '^| clients | serve run / engine' "$out/$arm$n.log"
  done
done
