#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh has installed the wheels into /tmp/site: the
# engine-level labs of issue 36 in one call, their JSON and a log under $OUT.
#   - what a step that admits costs, part by part, at 32 / 16 / 4 newcomers a step, beside mlx_lm's
#     own prefill + decode of the same rows (benchmarks.lab.bench_join_steps);
#   - a py-spy profile (raw stacks) of steps that admit 16 at a time;
#   - speculation off vs ngram at 1 and 5 clients, with the engine's steps per wave
#     (python -m benchmarks speculative).
set -uo pipefail
. "$(dirname "$0")/on-device.sh" lab
model=${MODEL:-synthetic:qwen3-0.6b-8bit}
log=$out/lab.log
for join in 32 16 4; do
  steps=$(( join >= 16 ? 64 / join : 8 ))
  echo "== join $join x $steps" | tee -a "$log"
  timeout 150 python3 -m benchmarks.lab.bench_join_steps --model "$model" --join "$join" --join-steps "$steps" \
    --tokens 32 --rounds 4 --out "$out/join$join.json" >>"$log" 2>&1
done
echo "== py-spy: 16 join a step" | tee -a "$log"
timeout 120 py-spy record -r 300 --format raw -o "$out/join16.prof" -- python3 -m benchmarks.lab.bench_join_steps \
  --model "$model" --join 16 --join-steps 4 --tokens 4 --rounds 8 >>"$log" 2>&1
echo "== speculative" | tee -a "$log"
timeout 240 python3 -m benchmarks speculative --model "$model" --clients 1 5 --rounds 4 --max-tokens 128 \
  --out "$out/spec.json" >>"$log" 2>&1
grep -E "^== |^\| |mlx_lm's own" "$log"
