#!/usr/bin/env bash
# Runs ON the lent GPU machine: `python -m benchmarks vision` on synthetic:gemma-3-4b-vlm (gemma-3-4b-it's
# real shapes and vocabulary, random bf16 weights), with the wheels accel-wheels.sh made (.accel/p1..pN in
# the main checkout, ignored by git) plus the vision extra's wheels in .accel/vx (mlx-vlm and what its
# gemma3 path imports that the machine lacks: pillow, sentencepiece, httpx2, httpcore2, truststore), and
# this checkout's own tracked files. Options given to this script go to the suite (e.g. --rounds 5).
#
# Make .accel/vx, from the main checkout:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform any -d .accel/vx \
#     mlx-vlm==0.7.10 pillow==13.0.0 sentencepiece==0.2.3 httpx2==2.17.0 httpcore2==2.17.0 truststore
# One device call per part, chained (the machine stays warm ~30 s between calls):
#   carry [".accel/p1"]: mkdir -p /tmp/accel && cp .accel/p1/* /tmp/accel/       (the same for p2, p3)
#   carry [".accel/vx"]: bash benchmarks/gpu/vision-on-device.sh
exec bash "$(dirname "$0")/suite-on-device.sh" vision --model synthetic:gemma-3-4b-vlm --out "${OUT:-/tmp}/vision.json" "$@"
