"""When a finished container starts again, and after how long (the kubelet's crash-loop backoff)."""

from __future__ import annotations

from dataclasses import dataclass

ALWAYS = "Always"
ON_FAILURE = "OnFailure"
NEVER = "Never"


def should_restart(restart_policy: str, exit_code: int) -> bool:
    """Whether a container that exited with `exit_code` is started again under `restart_policy`."""
    if restart_policy == NEVER:
        return False
    if restart_policy == ON_FAILURE:
        return exit_code != 0
    return True


@dataclass(frozen=True)
class Backoff:
    """Delay before restart n (n >= 1) doubles from `initial` up to `cap`; a long run resets it.

    The kubelet uses 10 s doubling to 300 s and forgets after 10 minutes of running; the process
    node defaults to a faster loop because it runs on a developer's machine.
    """

    initial: float = 2.0
    cap: float = 60.0
    reset_after: float = 600.0

    def delay(self, consecutive_failures: int) -> float:
        if consecutive_failures <= 0:
            return 0.0
        return min(self.cap, self.initial * 2 ** (consecutive_failures - 1))

    def next_failures(self, consecutive_failures: int, ran_for_seconds: float) -> int:
        """The crash count after a run that lasted `ran_for_seconds`."""
        if ran_for_seconds >= self.reset_after:
            return 1
        return consecutive_failures + 1
