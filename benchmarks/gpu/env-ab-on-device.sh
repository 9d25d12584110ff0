#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh has installed the wheels into /tmp/site:
# `python -m benchmarks accel` once per arm, in turn, each arm's serve run with its own environment
# (the same tree): settings measured against each other on one card, the host's drift spread over
# the arms by ROUNDS passes (the arms' order reversed on every second pass).
# Usage: ARMS='base;ORCHARD_ARRIVAL_WINDOW_MS=150' ROUNDS=1 bash benchmarks/gpu/env-ab-on-device.sh [accel options]
#   ARMS: arms separated by ';', each `name` alone or `name:KEY=VALUE KEY=VALUE...`; every arm also
#   gets the --serve-env of the accel options. Each run's JSON is $OUT/<name><pass>.json.
set -uo pipefail
code=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/env-ab-out}
mkdir -p "$out"
export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/tmp/site:$code
IFS=';' read -r -a arms <<< "${ARMS:?name the arms}"
cd "$code"
for pass in $(seq 1 "${ROUNDS:-1}"); do
  order=("${arms[@]}")
  if (( pass % 2 == 0 )); then order=(); for (( i=${#arms[@]}-1; i>=0; i-- )); do order+=("${arms[i]}"); done; fi
  for arm in "${order[@]}"; do
    name=${arm%%:*}; env=""; [[ $arm == *:* ]] && env=${arm#*:}
    pkill -x haproxy 2>/dev/null
    # shellcheck disable=SC2086 # the arm's KEY=VALUE words
    python3 -m benchmarks accel --workdir "/tmp/env-ab-$name$pass" --out "$out/$name$pass.json" "$@" \
      ${env:+--serve-env $env} > "$out/$name$pass.log" 2>&1
    echo "== $name$pass [$env] exit $?"
    grep -A 8 '^| clients | serve run / engine' "$out/$name$pass.log"
    grep -A 12 '^| target @ clients' "$out/$name$pass.log" | cut -c1-400
  done
done
