"""NVLink-aware placement: plan where a replica's pods may run, as Kubernetes scheduling terms."""

from kiln.placement.model import (
    LWS_EXCLUSIVE_TOPOLOGY,
    LWS_GROUP_KEY,
    NodeTopology,
    NVLinkPolicy,
    Placement,
    ReplicaShape,
)
from kiln.placement.planner import PlacementPolicy, plan

__all__ = [
    "LWS_EXCLUSIVE_TOPOLOGY",
    "LWS_GROUP_KEY",
    "NVLinkPolicy",
    "NodeTopology",
    "Placement",
    "PlacementPolicy",
    "ReplicaShape",
    "plan",
]
