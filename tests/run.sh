#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh machine, then runs
# lint, type checks, the CRD freshness check and pytest (unit, integration, e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
source e2e/setup.sh
setup_s=$SECONDS

# What the later tests need and a fresh machine lacks (the real node's, MinIO's, Prometheus',
# cyclonus' and Argo CD's Go builds, Kiln's images from this checkout) is built in the background while lint and the first
# tests run: on a cold machine that takes the second core for most of the unit tests instead of
# adding its time to theirs; on a warm one it finds everything cached and only rebuilds the image
# layers this checkout changed. Every build takes a lock, so a test
# that needs one first waits for it.
prebuild_log=${KILN_PREBUILD_LOG:-/tmp/kiln-prebuild.log}
# Each step's time goes into the log as a `kiln-timing` line, printed at the end: whether this run
# was cold (Go builds, image layers) reads from the CI log itself.
timed() {
  local started=$SECONDS
  "$@"
  echo "kiln-timing: $* took $((SECONDS - started)) s"
}
# Two queues: the Go builds (CPU-bound) and the image build (on a cold machine mostly downloading
# and unpacking torch's wheels) overlap instead of adding up.
# In the order pytest reaches them: MinIO for tests/engine's S3 tests (built there in the foreground,
# against the other builds, it took 194 s of a cold run: ci-cold-2026-12-07-d.txt), then the real
# node's for tests/integration, the rest for e2e.
(
  timed kiln local build --s3
  timed kiln local build --real-node --monitoring --netpol
  timed python -m kiln.local.argocd
) >"$prebuild_log" 2>&1 &
go_builds=$!
(timed kiln images build) >"$prebuild_log.images" 2>&1 &
images=$!
# Under set -e a failing command in the trap would replace the exit status with its own: pkill
# finds nothing to stop when a build already ended, so each command is made unable to fail.
trap 'for job in $go_builds $images; do pkill -TERM -P "$job" 2>/dev/null || true; kill "$job" 2>/dev/null || true; done' EXIT

ruff check .
ruff format --check .
mypy
kiln crds generate --check
status=0
# The slowest tests, at the end of the log: where a cold or warm run's time goes.
pytest --durations=30 "$@" || status=$?
for log in "$prebuild_log" "$prebuild_log.images"; do
  job=$go_builds
  [[ $log == *.images ]] && job=$images
  if ! wait "$job"; then
    echo "a background build failed (the tests that need it built it themselves or failed):"
    tail -n 40 "$log"
  fi
done
echo "background build logs: $prebuild_log $prebuild_log.images"
echo "kiln-timing: setup (pip, control-plane binaries) took $setup_s s"
grep -h '^kiln-timing:' "$prebuild_log" "$prebuild_log.images" || true
echo "kiln-timing: the whole test command took $SECONDS s"
exit "$status"
