#!/usr/bin/env bash
# Installs Kiln with the engine and dev extras into .venv/ and builds (or reuses) the local
# control-plane binaries. Sourced by e2e/demo.sh and tests/run.sh; leaves .venv activated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# buildah, runc, mmdebstrap, ... from Debian (the real node and the image builds).
# shellcheck source=/dev/null
source e2e/system-packages.sh

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[engine,dev]'
# shellcheck source=/dev/null
source .venv/bin/activate

# etcd, kube-apiserver, controller-manager, scheduler, KWOK, helm and kubectl from pinned Go
# modules, cached per version under ~/.cache/kiln/bin (a warm run builds nothing).
kiln local build
