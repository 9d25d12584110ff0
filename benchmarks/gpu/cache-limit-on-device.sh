#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh has installed the wheels into /tmp/site:
# MLX's cache limit in a model process (engine.memory.apply_process_limits), in one call.
#   1-2. the long steps of a 64-client wave with the limits a replica sets now (cache = its share)
#        and with the old cache limit (a quarter of it): benchmarks.lab.long_steps --limits;
#   3.   the accelerator table, ours only (python -m benchmarks accel "$@"), if arguments are given.
# Each stage time-boxed; JSON and logs under $OUT.
set -uo pipefail
. "$(dirname "$0")/on-device.sh" cache
ray stop --force >/dev/null 2>&1
long() {  # name timeout args...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" python3 -m benchmarks.lab.long_steps --clients 64 --waves 4 --parts --limits "$@" \
    --out "$out/$name.json" >"$out/$name.log" 2>&1
  echo "exit $?"
  grep -E '^wave|^\| (sched|loop|read|issue_decode) ' "$out/$name.log"
}
long cache_share 240  # the first run also builds the synthetic model (~2 min on a fresh machine)
long cache_quarter 90 --cache-share 0.25
accel_stage /tmp/cache-accel "$@"
