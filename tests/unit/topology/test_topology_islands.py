"""NVLink islands from connectivity matrices of real machine layouts."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln.topology.islands import islands_from_matrix, max_island


def matrix(n: int, edges: list[tuple[int, int]]) -> list[list[bool]]:
    result = [[i == j for j in range(n)] for i in range(n)]
    for a, b in edges:
        result[a][b] = result[b][a] = True
    return result


def full(indices: range | list[int]) -> list[tuple[int, int]]:
    return list(itertools.combinations(indices, 2))


def test_nvswitch_node_is_one_island() -> None:
    assert islands_from_matrix(matrix(8, full(range(8)))) == [list(range(8))]


def test_pcie_node_without_nvlink_is_singletons() -> None:
    assert islands_from_matrix(matrix(8, [])) == [[i] for i in range(8)]


def test_bridged_pairs() -> None:
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert islands_from_matrix(matrix(8, pairs)) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_dgx1_hybrid_cube_mesh_splits_into_two_quads() -> None:
    # DGX-1V: 0-3 and 4-7 fully connected, plus one link across (i, i+4); the cross links form no clique
    # larger than 2, so each quad is an island and the cross links are not usable for TP=8.
    edges = full(range(4)) + full(range(4, 8)) + [(i, i + 4) for i in range(4)]
    islands = islands_from_matrix(matrix(8, edges))
    assert islands == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert max_island(islands) == 4


def test_ring_takes_lowest_pairs() -> None:
    # 0-1-2-3-0: no triangle; pairs, ties broken by lowest indices.
    assert islands_from_matrix(matrix(4, [(0, 1), (1, 2), (2, 3), (3, 0)])) == [[0, 1], [2, 3]]


def test_largest_clique_first_then_rest() -> None:
    # A triangle 1-2-3 plus 0 attached to 1 only: the triangle wins, 0 is alone.
    assert islands_from_matrix(matrix(4, [(0, 1), (1, 2), (2, 3), (1, 3)])) == [[0], [1, 2, 3]]


def test_empty_node() -> None:
    assert islands_from_matrix([]) == []
    assert max_island([]) == 0


def test_asymmetric_matrix_is_rejected() -> None:
    bad = [[True, True], [False, True]]
    with pytest.raises(ValueError, match="not symmetric"):
        islands_from_matrix(bad)


def test_ragged_matrix_is_rejected() -> None:
    with pytest.raises(ValueError, match="row 1"):
        islands_from_matrix([[True, False], [False]])


@given(
    st.integers(min_value=1, max_value=9).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))))
    )
)
def test_islands_partition_gpus_into_cliques(case: tuple[int, set[tuple[int, int]]]) -> None:
    n, edges = case
    connected = matrix(n, [(a, b) for a, b in edges if a != b])
    islands = islands_from_matrix(connected)
    assert sorted(i for island in islands for i in island) == list(range(n))
    for island in islands:
        assert all(connected[a][b] for a, b in itertools.combinations(island, 2))
    # The first island taken is a maximum clique: nothing larger is fully connected.
    largest = max_island(islands)
    for subset in itertools.combinations(range(n), largest + 1):
        assert not all(connected[a][b] for a, b in itertools.combinations(subset, 2))
