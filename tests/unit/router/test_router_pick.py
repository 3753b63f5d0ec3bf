"""The router's replica choice: prefix affinity that independent routers agree on, minimal movement
when a replica goes, and spilling off overloaded replicas."""

from __future__ import annotations

import random
import string

import pytest

from kiln_router.pick import Policy, ReplicaState, block_hashes, pick
from kiln_router.prompt import chat_prompt

POLICY = Policy(block_chars=32, affinity_blocks=8)
REPLICAS = [f"10.0.0.{i}:8000" for i in range(1, 7)]


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def idle(names: list[str]) -> dict[str, ReplicaState]:
    return {name: ReplicaState() for name in names}


def test_block_hashes_chain_so_a_shared_prefix_shares_exactly_its_blocks() -> None:
    shared = text(1, 100)  # 3 full blocks of 32 characters, then 4 more
    a = block_hashes(shared + "A" * 200, 32, 100)
    b = block_hashes(shared + "B" * 200, 32, 100)
    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:], strict=True))  # each later hash covers the divergence


def test_same_prefix_goes_to_the_same_replica_across_independent_routers() -> None:
    prefix = text(2, POLICY.block_chars * POLICY.affinity_blocks)
    # two routers, each with its own view built in a different order: no shared state
    router_a = idle(REPLICAS)
    router_b = idle(list(reversed(REPLICAS)))
    chosen = {pick(prefix + text(100 + i, 50), router, POLICY).order[0] for i in range(20) for router in
              (router_a, router_b)}  # fmt: skip
    assert len(chosen) == 1
    assert pick(prefix, router_a, POLICY).reason == "affinity"


def test_different_prefixes_spread_over_the_replicas() -> None:
    counts = dict.fromkeys(REPLICAS, 0)
    for i in range(600):
        counts[pick(text(i, 300), idle(REPLICAS), POLICY).order[0]] += 1
    assert min(counts.values()) > 600 / len(REPLICAS) / 2


def test_removing_a_replica_moves_only_the_prompts_it_had() -> None:
    prompts = [text(i, 300) for i in range(400)]
    before = {p: pick(p, idle(REPLICAS), POLICY).order[0] for p in prompts}
    gone = REPLICAS[2]
    after = {p: pick(p, idle([r for r in REPLICAS if r != gone]), POLICY).order[0] for p in prompts}
    moved = [p for p in prompts if before[p] != after[p]]
    assert moved and all(before[p] == gone for p in moved)
    assert len(moved) == sum(1 for p in prompts if before[p] == gone)
    # the prompts of the replica that left go where a router would have spilled them: its runner-up
    assert all(after[p] == pick(p, idle(REPLICAS), POLICY).order[1] for p in moved)


def test_every_turn_of_a_conversation_goes_where_its_first_turn_went() -> None:
    system = {"role": "system", "content": text(6, 100)}  # shorter than the affinity reach (256)
    chosen = {}
    for conversation in range(30):
        messages = [system, {"role": "user", "content": f"question {conversation}: {text(conversation, 20)}"}]
        replicas = set()
        for turn in range(4):
            prompt = chat_prompt({"messages": messages})
            replicas.add(pick(prompt.text, idle(REPLICAS), POLICY, prompt.conversation_chars).order[0])
            messages += [
                {"role": "assistant", "content": text(turn, 40)},
                {"role": "user", "content": "more"},
            ]
        assert len(replicas) == 1  # later turns outgrow the reach: still the first turn's replica
        chosen[conversation] = replicas.pop()
    assert len(set(chosen.values())) > 1  # conversations sharing only a system prompt spread


@pytest.mark.parametrize(
    "overload",
    [ReplicaState(queue_depth=POLICY.max_queue + 1), ReplicaState(kv_usage=0.99), ReplicaState(in_flight=20)],
    ids=["queue", "kv-cache", "in-flight"],
)
def test_an_overloaded_target_spills_to_the_next_replica_of_its_ranking(overload: ReplicaState) -> None:
    prompt = text(3, 400)
    states = idle(REPLICAS)
    target, runner_up = pick(prompt, states, POLICY).order[:2]
    states[target] = overload
    decision = pick(prompt, states, POLICY)
    assert (decision.order[0], decision.reason) == (runner_up, "spill")
    assert decision.order[-1] == target  # still tried last, if everything else fails


def test_when_every_replica_is_overloaded_the_least_loaded_takes_it() -> None:
    queues = [9, 7, 12, 6, 30, 8]
    states = {r: ReplicaState(queue_depth=q) for r, q in zip(REPLICAS, queues, strict=True)}
    decision = pick(text(4, 400), states, POLICY)
    assert decision.reason == "least_loaded"
    assert [states[r].queue_depth for r in decision.order] == sorted(queues)


def test_a_short_prompt_goes_to_the_least_loaded_replica() -> None:
    states = {r: ReplicaState(running=i) for i, r in enumerate(reversed(REPLICAS))}
    decision = pick("hi", states, POLICY)
    assert (decision.order[0], decision.reason, decision.prefix_chars) == (REPLICAS[-1], "short_prompt", 0)


def test_unhealthy_replicas_are_not_chosen_unless_nothing_else_is_left() -> None:
    prompt = text(5, 400)
    target = pick(prompt, idle(REPLICAS), POLICY).order[0]
    states = idle(REPLICAS)
    states[target] = ReplicaState(healthy=False)
    assert target not in pick(prompt, states, POLICY).order
    assert pick(prompt, {target: ReplicaState(healthy=False)}, POLICY).order == (target,)


def test_bad_policy_and_empty_replica_set_are_refused() -> None:
    with pytest.raises(ValueError, match="block_chars"):
        Policy(block_chars=0)
    with pytest.raises(ValueError, match="max_kv_usage"):
        Policy(max_kv_usage=1.5)
    with pytest.raises(ValueError, match="no replicas"):
        pick("x" * 1000, {}, POLICY)
