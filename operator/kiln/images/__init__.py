"""Development tooling that builds and checks Kiln's container images with buildah (`kiln images`)."""
