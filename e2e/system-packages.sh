#!/usr/bin/env bash
# Installs the Debian packages the local cluster's real node and the image builds need (buildah,
# runc, mmdebstrap, ...) and writes the container tools' settings this host needs. Sourced by
# e2e/setup.sh; installs nothing when every package is already there.
set -euo pipefail

# One package a line, with why.
KILN_DEBIAN_PACKAGES=(
  buildah         # builds the Dockerfiles without a Docker daemon
  podman          # runs and inspects the built images (kiln images build --check)
  runc            # the OCI runtime (crun fails on this host's hybrid cgroups)
  mmdebstrap      # the Debian base image of the local builds
  busybox-static  # the sandbox (pause) image and tiny test images
  iptables        # kube-proxy and the CNI bridge's masquerading
  iproute2        # `ip`: the real node's links and network namespaces (kiln/local/realnode.py)
  redis-server    # Argo CD's cache in the GitOps e2e (e2e/test_gitops.py)
)

kiln_missing_packages() {
  local pkg
  for pkg in "${KILN_DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || echo "$pkg"
  done
}

missing=$(kiln_missing_packages)
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "system-packages: missing Debian packages (run as root to install): $missing" >&2
  else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

# runc with the cgroupfs driver and no default ulimits: what works on this host (systemd cgroups
# and crun do not).
if [ "$(id -u)" = 0 ] && [ ! -e /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  cat >/etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
fi
