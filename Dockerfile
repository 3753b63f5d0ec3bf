# Kiln's control-plane image, ghcr.io/kiln-dev/kiln: the `kiln` command that the Helm chart runs as
# `kiln operator run`, `kiln autoscaler run` and `kiln topology-agent`. No torch: engines run in
# engine-image/Dockerfile.torch.
#
#   kiln images build                                   # buildah, no Docker
#   docker build -t ghcr.io/kiln-dev/kiln:0.1.0 .       # or Docker, from the repo root
#
# Runs as uid/gid 65532 (the distroless "nonroot" convention; the chart's pods set the same
# runAsUser) with a read-only root filesystem. Layers are ordered so that a change to Kiln's source
# rebuilds only the small wheel layer, never the dependency layer.

# Any Debian or Ubuntu image (apt-get); `kiln images build` passes a bookworm rootfs from mmdebstrap.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# ---- the operating system: Python, tini as PID 1, the virtualenv and the non-root user ------------
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/kiln \
 && (getent passwd 65532 >/dev/null \
     || useradd --uid 65532 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin nonroot)

# ---- the dependency list alone, so that the layer below is rebuilt only when it changes ------------
FROM runtime AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"]))' > /requirements.txt

# ---- the kiln wheel (pure Python) -------------------------------------------------------------------
FROM runtime AS wheel
# The CA bundle pip trusts; `kiln images build` points it at the host's (TLS-intercepting proxies).
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN /opt/kiln/bin/pip install --no-cache-dir "hatchling>=1.25"
COPY pyproject.toml README.md /src/
COPY crds /src/crds
COPY autoscaler /src/autoscaler
COPY engine-image /src/engine-image
COPY operator /src/operator
COPY router /src/router
RUN /opt/kiln/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels /src

# ---- the image: dependencies first, then the wheel --------------------------------------------------
FROM runtime
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY --from=requirements /requirements.txt /opt/kiln/requirements.txt
# The wheels are kept in a cache mount that outlives the layer: `pip download` fetches only those
# missing (pip's own HTTP cache stores nothing behind proxies that send no caching headers), then
# the layer installs offline from it.
RUN --mount=type=cache,target=/var/cache/kiln-wheels \
    /opt/kiln/bin/pip download --progress-bar off --dest /var/cache/kiln-wheels \
      --requirement /opt/kiln/requirements.txt \
 && /opt/kiln/bin/pip install --no-index --find-links /var/cache/kiln-wheels \
      --requirement /opt/kiln/requirements.txt
COPY --from=wheel /wheels /opt/kiln/wheels
RUN /opt/kiln/bin/pip install --no-cache-dir --no-deps /opt/kiln/wheels/kiln-*.whl \
 && /opt/kiln/bin/python -c "import kiln.controller.cli, kiln_autoscaler.cli, kiln.topology.agent, kiln_router.cli"
ENV PATH=/opt/kiln/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp \
    TMPDIR=/tmp
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["/usr/bin/tini", "--", "kiln"]
CMD ["--help"]
