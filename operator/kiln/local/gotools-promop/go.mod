// Pinned sources of the local cluster's monitoring: the Prometheus Operator and its
// prometheus-config-reloader, built by `kiln local build --monitoring` (kiln/local/build.py), and
// the operator's CRDs, read from the same module version (kiln/local/monitoring.py). A module of
// its own, with the operator's own pins.
module kiln.dev/local/gotools-promop

go 1.26.0

require github.com/prometheus-operator/prometheus-operator v0.85.0
