#!/usr/bin/env bash
# The main job: a local control plane, Kiln installed through its Helm chart, the tiny model
# built and served, answered through its Service, then autoscaled under a burst of load.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/setup.sh
exec kiln demo "$@"
