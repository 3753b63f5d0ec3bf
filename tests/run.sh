#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh machine, then runs
# lint, type checks, the CRD freshness check and pytest (unit, integration, e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/setup.sh

ruff check .
ruff format --check .
mypy
kiln crds generate --check
pytest "$@"
