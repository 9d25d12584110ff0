#!/usr/bin/env bash
# Runs ON the lent GPU machine: the kvquant suite's capacity and throughput on synthetic:qwen3-0.6b-8bit
# (Qwen3-0.6B's shapes, 8-bit weights with bf16 scales, random values) through suite-on-device.sh; options
# go to the suite after these (e.g. --bits 16 8). Carry .accel/p1, p2 as suite-on-device.sh says, then
#   carry [".accel/p3"]: bash benchmarks/gpu/kvquant-on-device.sh --bits 16 8 4
exec bash "$(dirname "$0")/suite-on-device.sh" kvquant --models synthetic:qwen3-0.6b-8bit --parts capacity throughput \
  --cache-mb 512 --clients 16 64 --max-tokens 128 --json-out "${OUT:-/tmp}/kvquant.json" "$@"
