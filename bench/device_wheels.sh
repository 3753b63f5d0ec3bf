#!/usr/bin/env bash
# Wheels for the lent GPU machine's python (3.12, x86_64), which has torch, triton, transformers,
# tokenizers, numpy and safetensors but not what Kiln's server, structured outputs and topology agent
# add. bench/engine_gpu.sh installs .whl/*.whl into /tmp/site (no index, no deps) before the stages
# that need them (so-8b, lora, serve, topology). .whl/ is ignored; run this once per checkout:
#
#   bash bench/device_wheels.sh && ls .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES=(
  xgrammar apache-tvm-ffi
  pydantic pydantic-core annotated-types typing-inspection typing-extensions
  fastapi starlette anyio sniffio annotated-doc opentelemetry-api importlib-metadata zipp
  uvicorn h11 click
  prometheus-client nvidia-ml-py pyyaml jinja2 markupsafe
)
mkdir -p .whl
"$PY" -m pip download --quiet --dest .whl --only-binary=:all: --no-deps --implementation cp \
  --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any "${PACKAGES[@]}"
echo "$(ls .whl/*.whl | wc -l) wheels in .whl/"
