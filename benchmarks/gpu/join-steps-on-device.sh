#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh installed the wheels into /tmp/site: the
# join-step lab (benchmarks/lab/bench_join_steps.py) in each variant, alternating, on one card.
# A variant is LABEL=TREE[:ENV=VALUE] (TREE: a checkout, e.g. a carried export of an older commit).
#   bash benchmarks/gpu/join-steps-on-device.sh before=.accel/base after=.
# Each variant runs a lone request (`--join 1 --join-steps 1 --tokens 16 --rounds 8`), then twice the
# default schedule (4 requests join each of 16 steps, 64 tokens, 2 rounds); JSON under $OUT/join/.
# JOIN_ARGS: more arguments for every run (e.g. `--model smollm2-135m-instruct` to try it on a CPU).
set -euo pipefail
out=${OUT:-/tmp/join-out}/join
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
run() {  # label tree env name args...
  local label=$1 tree=$2 env=$3 name=$4
  shift 4
  echo "== $label $name $*"
  (cd "$tree" && env ${env:+"$env"} PYTHONPATH="/tmp/site:$PWD" timeout 150 \
    python3 -m benchmarks.lab.bench_join_steps "$@" ${JOIN_ARGS:-} --out "$out/${name}_$label.json" | grep -E "^round|first token" || true)
}
for pass in 1 2; do
  for variant in "$@"; do
    label=${variant%%=*} rest=${variant#*=}
    tree=${rest%%:*} env=""
    [ "$rest" = "$tree" ] || env=${rest#*:}
    [ "$pass" = 2 ] || run "$label" "$tree" "$env" single --join 1 --join-steps 1 --tokens 16 --rounds 8
    run "$label" "$tree" "$env" "join$pass" --rounds 2
  done
done
