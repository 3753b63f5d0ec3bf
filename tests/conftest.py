"""Shared pytest fixtures: the local control plane (`local_cluster`, for @pytest.mark.cluster tests)
and, on request, a process node on it (`process_node`: pods there run as local processes)."""

from kiln.local.testing import local_cluster, process_node

__all__ = ["local_cluster", "process_node"]
