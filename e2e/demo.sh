#!/usr/bin/env bash
# The main job: a local control plane with a real node (kubelet, containerd, runc), Kiln's images
# built and imported, Kiln installed through its Helm chart, the tiny model built and served from
# the engine image, answered through its Service by DNS name, then autoscaled under a burst of load.
# Options go to `kiln demo` (--keep, --down, --concurrency N, ...; see docs/demo.md).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
source e2e/setup.sh
echo "setup (.venv and control-plane binaries) took $((SECONDS - started)) s"
# One real node per machine: a second demo (or an e2e run) waits for this one instead of failing.
exec flock /tmp/kiln-real-node.lock kiln demo "$@"
