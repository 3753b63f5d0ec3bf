"""Which replica serves a request: prefix affinity by rendezvous hashing, bounded by replica load. Pure.

The prompt text is cut into fixed-size character blocks hashed as a chain (each block's hash covers
every block before it, as vLLM's and llm-d's KV block hashes do), so a block hash names a whole
prefix. The affinity key is the hash of the prompt's first `affinity_blocks` full blocks, or, for a
chat, of its text through the first user message when that is shorter (every turn of a conversation
keeps that part): requests that share that prefix share the key. Rendezvous (highest-random-weight)
hashing ranks the replicas for the key, so every router replica that sees the same replica set ranks
them the same way with no shared state, and removing a replica moves only the keys it ranked first.

The first-ranked replica is the affinity target. A replica is skipped while it is overloaded: its
engine queue or KV-cache usage (scraped from its /metrics) is over a threshold, or this router
already has more requests in flight on it than `load_factor` times the mean plus a little slack (an
engine batches a few requests at no cost): consistent hashing with bounded loads. The next replica
in the ranking takes the request (every router spills that prefix to the same one, so it warms up
for it too); when all are overloaded, the least loaded one does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Reason = Literal["affinity", "spill", "least_loaded", "short_prompt"]
REASONS: tuple[Reason, ...] = ("affinity", "spill", "least_loaded", "short_prompt")

_DIGEST = 16  # bytes of each block hash: collisions are as unlikely as vLLM's


@dataclass(frozen=True)
class Policy:
    """How far affinity reaches and when a replica counts as overloaded."""

    block_chars: int = 64
    affinity_blocks: int = 16  # the key covers the first block_chars * affinity_blocks characters
    max_queue: float = 4  # engine requests waiting for admission
    max_kv_usage: float = 0.9  # engine KV-cache blocks used / total
    load_factor: float = 1.25  # in flight from this router, relative to the mean over replicas
    in_flight_slack: int = 2  # more in flight a replica takes before that counts (engines batch them)

    def __post_init__(self) -> None:
        if self.block_chars < 1 or self.affinity_blocks < 1:
            raise ValueError("block_chars and affinity_blocks must be at least 1")
        if self.max_queue < 0 or not 0 < self.max_kv_usage <= 1:
            raise ValueError("max_queue must be >= 0 and max_kv_usage in (0, 1]")
        if self.load_factor < 1 or self.in_flight_slack < 0:
            raise ValueError("load_factor must be at least 1 (1 = perfectly even), in_flight_slack >= 0")


@dataclass(frozen=True)
class ReplicaState:
    """What the router knows of one replica: its engine's gauges and its own requests on it."""

    queue_depth: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    in_flight: int = 0  # requests this router has outstanding on the replica (fresher than a scrape)
    healthy: bool = True  # its last scrape or connection succeeded


@dataclass(frozen=True)
class Decision:
    """The replicas in the order to try them (the first is the choice, the rest are for retries)."""

    order: tuple[str, ...]
    reason: Reason
    prefix_chars: int  # characters of the prompt the affinity key covers (0 without one)
    key: bytes = b""  # the affinity key: the hash of those characters


def block_hashes(text: str, block_chars: int, max_blocks: int) -> list[bytes]:
    """Chained hashes of the text's first full blocks: hash i covers characters [0, (i+1)*block_chars)."""
    hashes: list[bytes] = []
    previous = b""
    for i in range(min(len(text) // block_chars, max_blocks)):
        block = text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + block, digest_size=_DIGEST).digest()
        hashes.append(previous)
    return hashes


def affinity_key(text: str, policy: Policy, conversation_chars: int | None = None) -> tuple[bytes, int]:
    """The affinity key and how many characters it covers ((b"", 0): the prompt is too short to have
    one). A chat's conversation prefix, when shorter than the affinity reach, is the key exactly,
    its last partial block included (it ends where the conversation's own text begins)."""
    reach = policy.block_chars * policy.affinity_blocks
    if conversation_chars is None or min(conversation_chars, len(text)) >= reach:
        hashes = block_hashes(text, policy.block_chars, policy.affinity_blocks)
        return (hashes[-1], len(hashes) * policy.block_chars) if hashes else (b"", 0)
    end = min(conversation_chars, len(text))
    full = end // policy.block_chars
    hashes = block_hashes(text, policy.block_chars, full)
    key = hashes[-1] if hashes else b""
    tail = text[full * policy.block_chars : end]
    if tail:
        key = hashlib.blake2b(key + tail.encode("utf-8", "surrogatepass"), digest_size=_DIGEST).digest()
    return key, end


def rank(key: bytes, replicas: Sequence[str]) -> list[str]:
    """Replicas by rendezvous weight for the key, highest first (ties broken by name)."""
    weights = {r: hashlib.blake2b(r.encode() + b"\0" + key, digest_size=8).digest() for r in replicas}
    return sorted(replicas, key=lambda r: (weights[r], r), reverse=True)


def pick(
    text: str, replicas: Mapping[str, ReplicaState], policy: Policy, conversation_chars: int | None = None
) -> Decision:
    """The replica order for a prompt: its affinity ranking with overloaded replicas moved last."""
    if not replicas:
        raise ValueError("no replicas to choose from")
    healthy = [r for r, s in replicas.items() if s.healthy]
    names = healthy or list(replicas)  # when every scrape failed, still try them all
    by_load = sorted(names, key=lambda r: (_pending(replicas[r]), replicas[r].kv_usage, r))
    key, prefix_chars = affinity_key(text, policy, conversation_chars)
    if not prefix_chars:
        return Decision(tuple(by_load), "short_prompt", 0)
    bound = _in_flight_bound(replicas, names, policy)
    ranking = rank(key, names)
    fit = [r for r in ranking if not _overloaded(replicas[r], bound, policy)]
    if not fit:
        return Decision(tuple(by_load), "least_loaded", prefix_chars, key)
    rest = [r for r in by_load if r not in fit]
    return Decision((*fit, *rest), "affinity" if fit[0] == ranking[0] else "spill", prefix_chars, key)


def _pending(state: ReplicaState) -> float:
    """Requests on the replica: its engine's count, or this router's own when the scrape is behind."""
    return max(state.queue_depth + state.running, state.in_flight)


def _in_flight_bound(replicas: Mapping[str, ReplicaState], names: Sequence[str], policy: Policy) -> int:
    """Most requests one replica may hold from this router, counting the new one (bounded loads)."""
    total = sum(replicas[r].in_flight for r in names) + 1
    return math.ceil(policy.load_factor * total / len(names)) + policy.in_flight_slack


def _overloaded(state: ReplicaState, in_flight_bound: int, policy: Policy) -> bool:
    return (
        state.queue_depth > policy.max_queue
        or state.kv_usage > policy.max_kv_usage
        or state.in_flight + 1 > in_flight_bound
    )
