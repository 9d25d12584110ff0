#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh has installed the wheels into /tmp/site:
# issue 36's question of where a burst's added TTFT goes, in one call, each step time-boxed.
#   1. Ray Serve's own floor (benchmarks.lab.serve_floor): a replica that does nothing, behind Ray's
#      proxy and then behind HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1), 1 / 5 / 16 / 64 clients;
#   2. the accelerator table with the current defaults (python -m benchmarks accel "$@"), if given;
#   3. what the engine's long steps coincide with (benchmarks.lab.long_steps), 64 clients.
# JSON and logs under $OUT.
set -uo pipefail
. "$(dirname "$0")/on-device.sh" floor
ray stop --force >/dev/null 2>&1
echo "== serve_floor, Ray's proxy"
timeout "${FLOOR_S:-60}" python3 -m benchmarks.lab.serve_floor --clients 1 5 16 64 --waves 4 \
  --ingress-replicas 4 --out "$out/floor_proxy.json" >"$out/floor_proxy.log" 2>&1; grep '^|' "$out/floor_proxy.log"
ray stop --force >/dev/null 2>&1
echo "== serve_floor, HAProxy"
RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_MAXCONN=1000 timeout "${FLOOR_S:-60}" python3 -m benchmarks.lab.serve_floor \
  --clients 1 5 16 64 --waves 4 --ingress-replicas 4 --out "$out/floor_haproxy.json" >"$out/floor_haproxy.log" 2>&1; grep '^|' "$out/floor_haproxy.log"
ray stop --force >/dev/null 2>&1; pkill -x haproxy 2>/dev/null
accel_stage /tmp/floor-accel "$@"
echo "== long_steps"
timeout "${LONG_S:-90}" python3 -m benchmarks.lab.long_steps --clients 64 --waves 4 --out "$out/long_steps.json" \
  >"$out/long_steps.log" 2>&1; grep -E '^\||^wave|^step' "$out/long_steps.log" | head -60
