#!/usr/bin/env bash
# Installs Kiln with the engine and dev extras into .venv/ and builds (or reuses) the local
# control-plane binaries. Sourced by e2e/demo.sh and tests/run.sh; leaves .venv activated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The control plane's Go build (CPU-bound) runs while apt and pip download (mostly network): it needs
# only Python's standard library, so it starts before .venv exists. `kiln local build` below waits
# on its lock and finds the binaries (or, if this one failed, builds them again and shows the error).
# It runs in a session of its own, so that if setup stops early (a pip error, Ctrl-C) the trap stops
# it with its `go build`.
kiln_control_plane_log=${KILN_CONTROL_PLANE_LOG:-/tmp/kiln-control-plane-build.log}
PYTHONPATH=operator setsid python3 -c 'from kiln.local import build; build.build()' >"$kiln_control_plane_log" 2>&1 &
kiln_control_plane_build=$!
trap 'kill -TERM -- "-$kiln_control_plane_build" 2>/dev/null || true' EXIT

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
wait "$kiln_control_plane_build" || echo "setup: the early control-plane build failed ($kiln_control_plane_log)"
trap - EXIT
kiln local build
