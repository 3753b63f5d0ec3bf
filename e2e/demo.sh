#!/usr/bin/env bash
# The main job: a local control plane, Kiln installed through its Helm chart, the tiny model
# built and served, answered through its Service, then autoscaled under a burst of load.
# Options go to `kiln demo` (--keep, --down, --concurrency N, ...; see docs/demo.md).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
source e2e/setup.sh
echo "setup (.venv and control-plane binaries) took $((SECONDS - started)) s"
exec kiln demo "$@"
