"""The device-plugin and node-affinity model that the benchmark and packing tests rely on."""

from __future__ import annotations

import pytest

from kiln.placement.simulate import (
    allocate_gpus,
    node_matches,
    preference_score,
    stranded_gpus,
    within_one_island,
)

PAIRS = [[0, 1], [2, 3], [4, 5], [6, 7]]
SINGLES = [[i] for i in range(8)]


def test_single_gpu_takes_the_lowest_free_index() -> None:
    assert allocate_gpus(PAIRS, [3, 5, 6], 1) == (3,)


def test_pair_comes_from_one_bridge_when_one_is_free() -> None:
    # GPUs 0 and 2 are taken; the free set 1,3,4,5,6,7 still holds whole pairs 4-5 and 6-7.
    assert allocate_gpus(PAIRS, [1, 3, 4, 5, 6, 7], 2) in {(4, 5), (6, 7)}


def test_pair_without_a_free_bridge_spans_islands() -> None:
    gpus = allocate_gpus(PAIRS, [1, 3, 5, 7], 2)
    assert gpus is not None and not within_one_island(PAIRS, gpus)


def test_four_on_bridged_pairs_maximizes_the_partition_score() -> None:
    # Free: 1, 2-3, 4-5, 7. Taking 2,3,4,5 (leaving 1,7) and taking 1,2,3,7 (leaving the pair 4-5) score
    # the same over the whole partition; like go-gpuallocator, the first such partition wins.
    assert allocate_gpus(PAIRS, [1, 2, 3, 4, 5, 7], 4) == (1, 2, 3, 7)


def test_not_enough_free() -> None:
    assert allocate_gpus(PAIRS, [0, 1], 4) is None
    assert allocate_gpus(PAIRS, [0, 1], 0) is None


def test_no_nvlink_takes_any() -> None:
    assert allocate_gpus(SINGLES, range(8), 8) == tuple(range(8))


def test_stranded_gpus_by_shape() -> None:
    assert stranded_gpus(PAIRS, [1, 3, 4, 5], 2) == 2
    assert stranded_gpus([list(range(8))], [0, 1, 2, 3, 4], 4) == 1
    assert stranded_gpus(SINGLES, [0, 1], 1) == 0
    assert stranded_gpus(SINGLES, [0, 1], 2) == 2


@pytest.mark.parametrize(
    ("expression", "node_labels", "matches"),
    [
        ({"key": "a", "operator": "In", "values": ["1", "2"]}, {"a": "2"}, True),
        ({"key": "a", "operator": "In", "values": ["1"]}, {}, False),
        ({"key": "a", "operator": "NotIn", "values": ["1"]}, {}, True),
        ({"key": "a", "operator": "Exists"}, {"a": ""}, True),
        ({"key": "a", "operator": "DoesNotExist"}, {"a": "x"}, False),
        ({"key": "a", "operator": "Gt", "values": ["3"]}, {"a": "4"}, True),
        ({"key": "a", "operator": "Gt", "values": ["3"]}, {"a": "3"}, False),
        ({"key": "a", "operator": "Gt", "values": ["3"]}, {"a": "many"}, False),
        ({"key": "a", "operator": "Lt", "values": ["3"]}, {"a": "2"}, True),
    ],
)
def test_node_selector_operators(expression: dict, node_labels: dict[str, str], matches: bool) -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [expression]}]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 7, "preference": {"matchExpressions": [expression]}}
            ],
        }
    }
    assert node_matches(affinity, node_labels) is matches
    assert preference_score(affinity, node_labels) == (7 if matches else 0)


def test_no_affinity_matches_everything() -> None:
    assert node_matches({}, {}) is True
    assert preference_score({}, {"a": "1"}) == 0


def test_any_gpu_may_be_the_one_left_over() -> None:
    # Free 5, 6-7: the pair 6-7 is whole; go-gpuallocator's padding lets 5 be the leftover.
    assert allocate_gpus(PAIRS, [5, 6, 7], 2) == (6, 7)
