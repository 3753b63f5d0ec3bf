"""Step-by-step progress of a long command: one numbered line per step, elapsed times, and failures.

    [  0:03] 2/12 Start the local cluster ...
             kube-apiserver ready (port 40113) after 4.1 s
    [  0:09] 2/12 Start the local cluster: done in 6.2 s

A step that raises is reported with its title and the tail of the logs that explain it, and the
exception is re-raised as `StepFailed`, so the caller tears down and exits non-zero.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

INDENT = " " * 11


def clock(seconds: float) -> str:
    """Elapsed seconds as m:ss (or h:mm:ss)."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


class StepFailed(RuntimeError):
    """A step failed; `step` is its title, `detail` the explanation (message and log tails)."""

    def __init__(self, number: int, step: str, detail: str) -> None:
        super().__init__(f"step {number} ({step}) failed: {detail}")
        self.number = number
        self.step = step
        self.detail = detail


class DemoError(RuntimeError):
    """An expected failure inside a step: the message says what went wrong and what to look at."""


@dataclass
class Progress:
    """Prints numbered steps with the time since `start`; `total` is the number of planned steps."""

    total: int
    echo: Callable[[str], None] = print
    now: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)
    number: int = 0
    current: str | None = None

    def __post_init__(self) -> None:
        if not self.start:
            self.start = self.now()

    def elapsed(self) -> float:
        return self.now() - self.start

    def stamp(self) -> str:
        return f"[{clock(self.elapsed()):>7}]"

    def info(self, line: str) -> None:
        """A detail line under the current step (each line of a multi-line text indented)."""
        for part in line.splitlines() or [""]:
            self.echo(f"{INDENT}{part}")

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Progress]:
        """Run the body as the next step; a raised exception becomes `StepFailed`."""
        self.number += 1
        self.current = title
        began = self.now()
        self.echo(f"{self.stamp()} {self.number}/{self.total} {title} ...")
        try:
            yield self
        except StepFailed:
            raise
        except (Exception, KeyboardInterrupt) as error:
            reason = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else str(error)
            if not isinstance(error, (DemoError, KeyboardInterrupt)):
                reason = f"{type(error).__name__}: {reason}"
            self.echo(
                f"{self.stamp()} {self.number}/{self.total} {title}: FAILED after {self.now() - began:.1f} s"
            )
            raise StepFailed(self.number, title, reason) from error
        self.echo(f"{self.stamp()} {self.number}/{self.total} {title}: done in {self.now() - began:.1f} s")
        self.current = None
