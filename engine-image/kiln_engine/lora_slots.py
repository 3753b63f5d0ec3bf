"""Which LoRA adapter holds each of the fixed number of device slots: a plain-Python LRU policy.

A running sequence pins its adapter's slot; a slot no sequence pins keeps its adapter loaded until
it is the least recently released one and another adapter needs a slot. The scheduler asks for a
slot when it admits a sequence and releases it when the sequence is preempted or finishes.
"""

from __future__ import annotations

from collections import OrderedDict


class LoraSlots:
    """Which adapter each of `num_slots` GPU slots holds, and who pins it (plain Python).

    `acquire` returns the adapter's slot, assigning one when it has none: a free slot, else the
    least recently released slot that nothing pins (its adapter is evicted). None: every slot is
    pinned, so the request waits. The model runner loads an adapter's weights when it first sees
    its slot hold it.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"max_loras must be at least 1, got {num_slots}")
        self.slot_of: dict[str, int] = {}
        self.holder: list[str | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))  # LRU first
        self.evictions_total = 0

    def acquire(self, name: str) -> int | None:
        slot = self.slot_of.get(name)
        if slot is None:
            if not self.idle:
                return None
            slot = next((s for s in self.idle if self.holder[s] is None), next(iter(self.idle)))
            old = self.holder[slot]
            if old is not None:
                del self.slot_of[old]
                self.evictions_total += 1
            self.holder[slot] = name
            self.slot_of[name] = slot
        self.idle.pop(slot, None)
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if self.pins[slot] <= 0:
            raise RuntimeError(f"LoRA slot {slot} released more often than acquired")
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            self.idle[slot] = None
