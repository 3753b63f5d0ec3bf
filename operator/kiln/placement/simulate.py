"""A small pure model of how a pod's GPUs get chosen: the scheduler's node-affinity rules and the
NVIDIA device plugin's best-effort GPU allocation, and a cluster of them. Used by tests and
`bench/placement.py`.

The kube-scheduler picks a node, never GPU indices; the device plugin picks the indices on that node.
NVIDIA's plugin (go-gpuallocator's best-effort policy) scores each candidate set by its pairwise links
(NVLink pairs far above PCIe pairs), choosing from the partition of the free GPUs into request-sized
sets with the highest total score; a single GPU is the lowest free index. `allocate_gpus` models that
with two link classes: same NVLink island, or not.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from kiln.placement.model import NodeTopology

NVLINK_PAIR_SCORE = 100  # go-gpuallocator: 100 per NVLink link
PCIE_PAIR_SCORE = 10  # go-gpuallocator: 10..60 by PCIe distance


def _requirement_matches(expression: Mapping[str, Any], node_labels: Mapping[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = [str(value) for value in expression.get("values") or []]
    present = key in node_labels
    value = node_labels.get(key)
    if operator == "In":
        return present and value in values
    if operator == "NotIn":
        return not present or value not in values
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator in ("Gt", "Lt"):
        try:
            actual, bound = int(str(value)), int(values[0])
        except (TypeError, ValueError, IndexError):
            return False
        return actual > bound if operator == "Gt" else actual < bound
    raise ValueError(f"unknown node selector operator {operator!r}")


def term_matches(term: Mapping[str, Any], node_labels: Mapping[str, str]) -> bool:
    """A nodeSelectorTerm: all its matchExpressions hold (an empty term matches nothing, as in Kubernetes)."""
    expressions = term.get("matchExpressions") or []
    return bool(expressions) and all(_requirement_matches(e, node_labels) for e in expressions)


def node_matches(affinity: Mapping[str, Any], node_labels: Mapping[str, str]) -> bool:
    """Whether a pod with this `affinity` passes the scheduler's NodeAffinity filter on the node."""
    required = (affinity.get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True
    return any(term_matches(term, node_labels) for term in required.get("nodeSelectorTerms") or [])


def preference_score(affinity: Mapping[str, Any], node_labels: Mapping[str, str]) -> int:
    """Sum of weights of the preferred node-affinity terms the node matches (NodeAffinity's raw score)."""
    preferred = (affinity.get("nodeAffinity") or {}).get("preferredDuringSchedulingIgnoredDuringExecution")
    return sum(
        int(term["weight"]) for term in preferred or [] if term_matches(term["preference"], node_labels)
    )


def _island_of(islands: Sequence[Sequence[int]]) -> dict[int, int]:
    return {gpu: number for number, island in enumerate(islands) for gpu in island}


def _set_score(gpus: Sequence[int], island_of: Mapping[int, int]) -> int:
    return sum(
        NVLINK_PAIR_SCORE if island_of.get(a, -1 - a) == island_of.get(b, -1 - b) else PCIE_PAIR_SCORE
        for a, b in itertools.combinations(gpus, 2)
    )


def _partitions(
    gpus: tuple[int, ...], size: int, short: int | None = None
) -> Iterator[list[tuple[int, ...]]]:
    """Every way to cut `gpus` into sets of `size` plus, when they do not divide evenly, one short set
    (go-gpuallocator pads the list with empty slots, so any GPU may be the one left over)."""
    if short is None:
        short = len(gpus) % size
    if not gpus:
        yield []
        return
    first, rest = gpus[0], gpus[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = tuple(gpu for gpu in rest if gpu not in others)
        for tail in _partitions(remaining, size, short):
            yield [(first, *others), *tail]
    if short:
        for others in itertools.combinations(rest, short - 1):
            remaining = tuple(gpu for gpu in rest if gpu not in others)
            for tail in _partitions(remaining, size, 0):
                yield [(first, *others), *tail]


def allocate_gpus(
    islands: Sequence[Sequence[int]], free: Iterable[int], count: int
) -> tuple[int, ...] | None:
    """The GPU indices NVIDIA's device plugin would hand a pod asking for `count` GPUs, or None.

    Best effort, as go-gpuallocator: among partitions of the free GPUs into sets of `count`, take the
    one with the highest total pair score, and from it the best full set. One GPU: the lowest free index.
    """
    available = tuple(sorted(free))
    if count <= 0 or len(available) < count:
        return None
    if count == 1:
        return (available[0],)
    island_of = _island_of(islands)
    best: tuple[int, tuple[int, ...]] | None = None
    for partition in _partitions(available, count):
        total = sum(_set_score(part, island_of) for part in partition)
        full = [part for part in partition if len(part) == count]
        chosen = max(full, key=lambda part: _set_score(part, island_of))
        if best is None or total > best[0]:
            best = (total, chosen)
    return None if best is None else best[1]


def within_one_island(islands: Sequence[Sequence[int]], gpus: Sequence[int]) -> bool:
    """Whether all `gpus` belong to one NVLink island."""
    island_of = _island_of(islands)
    return len({island_of.get(gpu, -1 - gpu) for gpu in gpus}) == 1


def stranded_gpus(islands: Sequence[Sequence[int]], free: Iterable[int], group: int) -> int:
    """Free GPUs that cannot join any NVLink-whole group of `group` GPUs (free but unusable by that shape)."""
    free_set = set(free)
    usable = sum((len(free_set & set(island)) // group) * group for island in islands)
    return len(free_set) - usable


class SimCluster:
    """Single-node pods placed one at a time, as the kube-scheduler's NodeAffinity filter and score
    (weight 2, scores normalized to 0..100) would, plus optionally GPU bin-packing (NodeResourcesFit
    MostAllocated on nvidia.com/gpu); the GPUs each pod gets follow `allocate_gpus`. Ties go to `rng`
    when given (the scheduler picks at random among the best nodes), else to the lowest node name.
    Pod affinity, taints and CPU/memory are not modelled.
    """

    def __init__(self, nodes: Sequence[NodeTopology]) -> None:
        self.nodes = {node.name: node for node in nodes if node.gpus > 0}
        self.free = {name: set(node.free_gpus()) for name, node in self.nodes.items()}

    def islands(self, name: str) -> list[list[int]]:
        node = self.nodes[name]
        if node.islands is None:
            return [[gpu] for gpu in range(node.gpus)]
        return [list(island) for island in node.islands]

    def schedule(
        self,
        affinity: Mapping[str, Any],
        gpus: int,
        *,
        rng: random.Random | None = None,
        pack_gpus: bool = False,
    ) -> tuple[str, tuple[int, ...]] | None:
        """Bind one pod asking for `gpus` GPUs: its node and GPU indices, or None (Unschedulable)."""
        feasible = [
            name
            for name, node in sorted(self.nodes.items())
            if len(self.free[name]) >= gpus and node_matches(affinity, node.labels)
        ]
        if not feasible:
            return None
        raw = {name: preference_score(affinity, self.nodes[name].labels) for name in feasible}
        top = max(raw.values()) or 1

        def score(name: str) -> int:
            total = 2 * (100 * raw[name] // top)
            if pack_gpus:
                node = self.nodes[name]
                total += 100 * (node.gpus - len(self.free[name]) + gpus) // node.gpus
            return total

        best = max(score(name) for name in feasible)
        chosen = [name for name in feasible if score(name) == best]
        name = rng.choice(chosen) if rng else chosen[0]
        return name, self.bind(name, gpus)

    def bind(self, name: str, gpus: int) -> tuple[int, ...]:
        """A pod asking for `gpus` GPUs was bound to node `name`: the GPUs the device plugin gives it."""
        allocated = allocate_gpus(self.islands(name), self.free[name], gpus)
        if allocated is None:
            raise ValueError(f"node {name} has {len(self.free[name])} free GPUs, not {gpus}")
        self.free[name] -= set(allocated)
        return allocated

    def stranded(self, group: int) -> int:
        """Free GPUs on nodes with an island of `group`, that no NVLink-whole group of `group` can use."""
        return sum(
            stranded_gpus(self.islands(name), self.free[name], group)
            for name, node in self.nodes.items()
            if node.max_island >= group
        )
