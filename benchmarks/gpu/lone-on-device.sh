#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh has installed the wheels into /tmp/site:
# why a lone request's admission step takes 35-63 ms in accel's engine row (the notebook's *MLX's
# cache limit made the long steps*) and 11-12 ms in benchmarks.lab.long_steps. The lab's lone
# requests met neither of the two things accel's met: wider waves first (accel's warm-up runs every
# width) and another model process on the card (accel's `serve run`, idle while the engine runs).
# Four lab stages, each with MLX's limits as a replica sets them, one thing changed at a time:
#   lone_plain        lone requests only
#   lone_warm64       after one 64-client wave
#   lone_beside       a `serve run` of the same model idling beside
#   lone_warm64_beside both
#   lone_pool         the KV pool grown to 6,000 blocks (~11 GB) first, as accel's waves leave it
# then, with ARGS, `python -m benchmarks accel ARGS` (accel_stage; e.g. --clients 1 --rounds 2
# --waves 4 --hops --peers). JSON under $OUT (6 files, the accel log a seventh), the stages' tables on
# stdout. The first stage builds the synthetic model on a fresh machine (~150 s): FIRST_S boxes it.
set -uo pipefail
. "$(dirname "$0")/on-device.sh" lone
ray stop --force >/dev/null 2>&1
logs=$(mktemp -d)
stage() {  # seconds name args...
  local secs=$1 name=$2
  shift 2
  echo "== $name: $*"
  timeout "$secs" python3 -m benchmarks.lab.long_steps --clients 1 --waves 8 --max-tokens 32 --parts --limits \
    "$@" --out "$out/$name.json" >"$logs/$name.log" 2>&1
  echo "exit $?"
  grep -E '^\||^wave|ready beside' "$logs/$name.log" | cut -c1-300 | head -30
  ray stop --force >/dev/null 2>&1
}
stage "${FIRST_S:-300}" lone_plain
stage "${STAGE_S:-120}" lone_warm64 --warm-clients 64
stage "${STAGE_S:-120}" lone_beside --beside serve
stage "${STAGE_S:-120}" lone_warm64_beside --warm-clients 64 --beside serve
stage "${STAGE_S:-120}" lone_pool --grow-pool 6000
accel_stage "$(mktemp -d)" "$@"
