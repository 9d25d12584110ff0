#!/usr/bin/env bash
# Runs ON the lent GPU machine: `python -m benchmarks hybrid` on synthetic:qwen3.5-0.8b-8bit through
# suite-on-device.sh (the wheels, this checkout's tracked files); its JSON goes under $OUT. Options given
# to this script go to the suite after the defaults (e.g. --rounds 3).
#
# One device call per part, chained (the machine stays warm ~30 s between calls), from the main checkout:
#   carry [".accel/p1"]: mkdir -p /tmp/accel && cp .accel/p1/* /tmp/accel/       (the same for p2)
#   carry [".accel/p3"]: bash benchmarks/gpu/hybrid-on-device.sh
exec bash "$(dirname "$0")/suite-on-device.sh" hybrid --model synthetic:qwen3.5-0.8b-8bit --out "${OUT:-/tmp}/hybrid.json" "$@"
