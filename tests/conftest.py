"""Shared pytest fixtures: the local control plane (`local_cluster`, for @pytest.mark.cluster tests)."""

from kiln.local.testing import local_cluster

__all__ = ["local_cluster"]
