"""Build progress: one `KILN_PROGRESS {json}` line per event on stdout, a tqdm bar on a TTY.

The operator reads these lines from the build pod's log, so the format is a contract:
`format_line` writes it and `parse_line` reads it. Deliberately free of torch (and of anything
heavy), so the operator side can import it.

Each step of the build owns a slice of the overall 0-100 %, in the order of `STEPS`; a step's own
fraction moves the overall percent inside that slice, which never goes backwards.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

PREFIX = "KILN_PROGRESS "

# (step, share of the whole build in %); the shares add up to 100.
STEPS: tuple[tuple[str, float], ...] = (
    ("fetch", 15.0),
    ("load", 5.0),
    ("convert", 40.0),
    ("write", 10.0),
    ("tokenizer", 2.0),
    ("capacity", 20.0),
    ("publish", 8.0),
)
DONE = "done"
FAILED = "failed"


def _round(value: float) -> float:
    return round(float(value), 1)


def format_line(step: str, percent: float, message: str = "", **extra: Any) -> str:
    """One machine-readable progress line (no trailing newline); `extra` keys are added as they are."""
    payload: dict[str, Any] = {"step": step, "percent": _round(percent), "message": message}
    for key, value in extra.items():
        if value is None:
            continue
        payload[key] = _round(value) if key.endswith("percent") else value
    return PREFIX + json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def parse_line(line: str) -> dict[str, Any] | None:
    """The payload of a progress line (which may carry a log prefix); None for any other line."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    try:
        payload = json.loads(line[at + len(PREFIX) :])
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("step"), str):
        return None
    return payload


def step_span(step: str) -> tuple[float, float]:
    """Where `step` starts in the overall percent, and its share."""
    start = 0.0
    for name, share in STEPS:
        if name == step:
            return start, share
        start += share
    raise ValueError(f"unknown build step {step!r}; steps: {', '.join(n for n, _ in STEPS)}")


def overall_percent(step: str, fraction: float) -> float:
    """The build's percent when `step` is `fraction` (0..1) done."""
    start, share = step_span(step)
    return start + share * min(max(fraction, 0.0), 1.0)


class Progress:
    """Reports build progress as lines on `out` (default stdout) and, if `bar`, a tqdm bar on stderr.

    Lines are rate-limited to one per `min_interval_s`, except the first of each step, a step's
    completion, `done` and `failed`, which are always written.
    """

    def __init__(
        self, out: IO[str] | None = None, bar: bool | None = None, min_interval_s: float = 1.0
    ) -> None:
        self.out = out if out is not None else sys.stdout
        self.min_interval_s = min_interval_s
        self.percent = 0.0
        self.step: str | None = None
        self._last_write = float("-inf")
        self._bar: Any = None
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=100.0, file=sys.stderr, bar_format="{percentage:5.1f}% |{bar:30}| {elapsed} {desc}"
            )

    def update(self, step: str, fraction: float, message: str = "") -> None:
        """`step` is `fraction` (0..1) done."""
        new_step = step != self.step
        self.step = step
        self.percent = max(self.percent, overall_percent(step, fraction))
        now = time.monotonic()
        if new_step or fraction >= 1.0 or now - self._last_write >= self.min_interval_s:
            self._last_write = now
            self._emit(step, self.percent, message, step_percent=100.0 * min(max(fraction, 0.0), 1.0))

    def done(self, message: str = "") -> None:
        self.step = DONE
        self.percent = 100.0
        self._emit(DONE, 100.0, message)
        self._close_bar()

    def failed(self, message: str, step: str | None = None, reason: str | None = None) -> None:
        """The build stopped; `step` defaults to the step it was in."""
        failed_step = step or self.step or STEPS[0][0]
        self._emit(FAILED, self.percent, message, failed_step=failed_step, reason=reason)
        self._close_bar()

    def _emit(self, step: str, percent: float, message: str, **extra: Any) -> None:
        self.out.write(format_line(step, percent, message, **extra) + "\n")
        self.out.flush()
        if self._bar is not None:
            self._bar.n = percent
            self._bar.set_description_str(f"{step}: {message}"[:60], refresh=False)
            self._bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
