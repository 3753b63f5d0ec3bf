"""A work queue of object keys for reconcile workers, as controller-runtime has: deduplicating,
never handing one key to two workers at once, with delayed adds for retries."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)


class WorkQueue(Generic[K]):
    """Keys waiting to be handled by `workers` threads.

    A key is queued at most once; a key added while a worker handles it is handled once more
    afterwards (so the last change is always seen), never concurrently.
    """

    def __init__(self, handle: Callable[[K], None], workers: int = 8, name: str = "kiln-worker") -> None:
        self._handle = handle
        self._workers = workers
        self._name = name
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._again: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []
        self._sequence = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []

    def add(self, key: K, delay: float = 0.0) -> None:
        """Queue `key` (after `delay` seconds)."""
        with self._cond:
            if delay > 0:
                self._sequence += 1
                heapq.heappush(self._delayed, (time.monotonic() + delay, self._sequence, key))
                self._cond.notify()
                return
            self._add_locked(key)

    def _add_locked(self, key: K) -> None:
        if key in self._processing:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
            self._cond.notify()

    def _next(self) -> K | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._add_locked(heapq.heappop(self._delayed)[2])
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                timeout = self._delayed[0][0] - now if self._delayed else None
                self._cond.wait(timeout)
            return None

    def _done(self, key: K) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._add_locked(key)
            if not self._queue and not self._processing:
                self._cond.notify_all()

    def _work(self) -> None:
        while (key := self._next()) is not None:
            try:
                self._handle(key)
            except Exception:  # the handler reports its own errors; a worker never dies of one
                log.exception("handling %s failed", key)
            finally:
                self._done(key)

    def start(self) -> None:
        for number in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def idle(self) -> bool:
        """Nothing queued (now) and nothing being handled."""
        with self._cond:
            return not self._queue and not self._processing

    def wait_idle(self, timeout: float) -> bool:
        """Block until idle or `timeout`; True when idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._processing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)
