#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh has installed the wheels into /tmp/site:
# issue 36's two open engine questions in one call, each stage time-boxed (STAGE_S), JSON and logs
# under $OUT.
#   1-3. the long steps of a 64-client wave (benchmarks.lab.long_steps --parts): the engine alone, with
#        MLX's memory and cache limits as a replica sets them (--limits, accel's engine row sets them
#        too), and with a `serve run` of the same model idling beside it (accel's engine-alone
#        waves had 4-14 long steps, this lab alone one);
#   4-5. a lone request per wave through the same AsyncEngine, its admission step part by part,
#        without and with the limits;
#   6.   a lone request in the join-step lab (the scheduler on one thread, no asyncio).
set -uo pipefail
. "$(dirname "$0")/on-device.sh" steps
ray stop --force >/dev/null 2>&1
stage() {  # name args...
  local name=$1
  shift
  echo "== $name: $*"
  timeout "${STAGE_S:-120}" python3 -m "$@" --out "$out/$name.json" >"$out/$name.log" 2>&1
  echo "exit $?"
  grep -E '^\||^wave|^round|first token|ready beside' "$out/$name.log" | cut -c1-400 | head -40
}
stage long_alone benchmarks.lab.long_steps --clients 64 --waves 4 --parts
stage long_limits benchmarks.lab.long_steps --clients 64 --waves 4 --parts --limits
stage long_beside benchmarks.lab.long_steps --clients 64 --waves 4 --parts --beside serve
ray stop --force >/dev/null 2>&1
stage lone_engine benchmarks.lab.long_steps --clients 1 --waves 8 --max-tokens 32 --parts
stage lone_limits benchmarks.lab.long_steps --clients 1 --waves 8 --max-tokens 32 --parts --limits
stage lone_sync benchmarks.lab.bench_join_steps --join 1 --join-steps 1 --tokens 16 --rounds 8
python3 - "$out"/l*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    d = json.load(open(path))
    print(path.rsplit("/", 1)[-1], d.get("limits"), "footprint", d.get("footprint_bytes"), "mlx", d.get("mlx_memory"))
PY
