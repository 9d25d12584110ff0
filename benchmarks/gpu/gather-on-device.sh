#!/usr/bin/env bash
# Runs ON the lent GPU machine, after accel-on-device.sh has installed the wheels into /tmp/site:
# what gathering a burst's requests into fewer handle calls (deployments.gather, the router's
# default since 2026-12-08) does on a host with cores to spare, each stage time-boxed.
#   1. Ray Serve's floor behind HAProxy (benchmarks.lab.serve_floor), 4 ingress replicas, each
#      request its own call and then gathered (--gather), 1 / 5 / 16 / 64 clients;
#   2. with ARGS: the accelerator table twice, `serve run` gathering (the default) and then each
#      request its own call (--no-gather), the same ARGS (e.g. --clients 1 16 64 --rounds 1
#      --waves 2 --router-replicas 4 --hops --peers --budget-s 100 --serve-env
#      RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_MAXCONN=1000).
# JSON under $OUT: floor_each.json, floor_gather.json, accel.json (gathering), accel_each.json.
set -uo pipefail
. "$(dirname "$0")/on-device.sh" gather
floor() {  # name args...
  local name=$1
  shift
  ray stop --force >/dev/null 2>&1
  pkill -x haproxy 2>/dev/null
  echo "== serve_floor, HAProxy, $name"
  RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_MAXCONN=1000 timeout "${FLOOR_S:-60}" python3 -m \
    benchmarks.lab.serve_floor --clients 1 5 16 64 --waves 4 --ingress-replicas 4 "$@" \
    --out "$out/floor_$name.json" >/tmp/floor_$name.log 2>&1
  grep '^|' /tmp/floor_$name.log
}
floor each
floor gather --gather
ray stop --force >/dev/null 2>&1
pkill -x haproxy 2>/dev/null
[ $# -gt 0 ] || exit 0
accel_stage /tmp/gather-accel "$@"
mv "$out/accel.log" /tmp/accel_gather.log 2>/dev/null
[ -f "$out/accel.json" ] && cp "$out/accel.json" /tmp/accel_gather.json
accel_stage /tmp/gather-accel-each "$@" --no-gather
mv "$out/accel.json" "$out/accel_each.json" 2>/dev/null
[ -f /tmp/accel_gather.json ] && cp /tmp/accel_gather.json "$out/accel.json"
