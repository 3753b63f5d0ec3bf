"""A real local Kubernetes control plane (etcd, kube-apiserver, ...) with KWOK-simulated GPU nodes."""
