"""The process node: a real Kubernetes Node whose pods run as local processes (`kiln process-node`).

Pure decisions (env, paths, probes, restarts, pod status, node manifests) live in their own
modules and are unit-tested with plain values; `runtime` and `agent` are the adapters that start
processes and talk to the API server. See docs/process-node.md.
"""
