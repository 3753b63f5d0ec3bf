"""Shared pytest fixtures: the local control plane (`local_cluster`, for @pytest.mark.cluster tests).

Hypothesis runs without its per-example deadline: a property test checks behaviour, and on a loaded
2-core CI machine an example can take longer than 200 ms without anything being wrong (speed lives
in bench/, never in tests).
"""

from hypothesis import settings

from kiln.local.testing import local_cluster

settings.register_profile("kiln", deadline=None)
settings.load_profile("kiln")

__all__ = ["local_cluster"]
