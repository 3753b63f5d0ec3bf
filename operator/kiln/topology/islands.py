"""NVLink islands: partition a node's GPUs into fully connected sets from a connectivity matrix."""

from __future__ import annotations

from collections.abc import Sequence

Islands = list[list[int]]


def _check_matrix(connected: Sequence[Sequence[bool]]) -> int:
    n = len(connected)
    for i, row in enumerate(connected):
        if len(row) != n:
            raise ValueError(f"connectivity matrix row {i} has {len(row)} entries, expected {n}")
        for j in range(n):
            if i != j and bool(row[j]) != bool(connected[j][i]):
                raise ValueError(f"connectivity matrix is not symmetric at ({i}, {j})")
    return n


def _max_cliques(adjacency: dict[int, set[int]], candidates: set[int]) -> list[frozenset[int]]:
    """All maximal cliques within `candidates` (Bron-Kerbosch with pivoting; a node has few GPUs)."""
    found: list[frozenset[int]] = []

    def expand(clique: set[int], pool: set[int], excluded: set[int]) -> None:
        if not pool and not excluded:
            found.append(frozenset(clique))
            return
        pivot = max(pool | excluded, key=lambda v: len(adjacency[v] & pool))
        for vertex in sorted(pool - adjacency[pivot]):
            expand(clique | {vertex}, pool & adjacency[vertex], excluded & adjacency[vertex])
            pool = pool - {vertex}
            excluded = excluded | {vertex}

    expand(set(), set(candidates), set())
    return found


def islands_from_matrix(connected: Sequence[Sequence[bool]]) -> Islands:
    """Partition GPU indices 0..n-1 into NVLink islands: disjoint sets whose members all link pairwise.

    `connected[i][j]` says GPUs i and j talk over NVLink (directly or through NVSwitch); the diagonal
    is ignored. Where the link graph is not a union of cliques (e.g. a DGX-1 hybrid cube mesh), the
    largest fully connected set is taken first (ties: lowest indices), then the rest is partitioned
    the same way, so every island is usable for one tensor-parallel group. Islands are sorted by
    their lowest GPU index, and each island's indices ascend.
    """
    n = _check_matrix(connected)
    adjacency = {i: {j for j in range(n) if j != i and connected[i][j]} for i in range(n)}
    remaining = set(range(n))
    islands: Islands = []
    while remaining:
        cliques = _max_cliques(adjacency, remaining)
        best = min(cliques, key=lambda clique: (-len(clique), sorted(clique)))
        islands.append(sorted(best))
        remaining -= best
    return sorted(islands, key=lambda island: island[0])


def max_island(islands: Sequence[Sequence[int]]) -> int:
    """Size of the largest island (0 for a node without GPUs)."""
    return max((len(island) for island in islands), default=0)
