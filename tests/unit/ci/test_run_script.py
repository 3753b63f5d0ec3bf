"""The test command's shell plumbing: its exit status is pytest's, whatever the background build did."""

import re
import subprocess
from pathlib import Path

RUN_SCRIPT = Path(__file__).resolve().parents[3] / "tests" / "run.sh"


def exit_trap() -> str:
    """The EXIT trap line of tests/run.sh, as the script sets it."""
    traps = [line for line in RUN_SCRIPT.read_text().splitlines() if re.match(r"trap .* EXIT$", line)]
    assert len(traps) == 1, traps
    return traps[0]


def run_with_trap(background: str, status: int, wait: bool = True) -> int:
    """The trap over the script's two background queues, each running `background`."""
    waits = 'wait "$go_builds" || true; wait "$images" || true' if wait else ""
    script = f"""set -euo pipefail
( {background} ) &
go_builds=$!
( {background} ) &
images=$!
{exit_trap()}
{waits}
exit {status}
"""
    return subprocess.run(["bash", "-c", script], check=False, timeout=30).returncode


def test_a_finished_background_build_keeps_the_exit_status_zero() -> None:
    # The CI run of 929c711 passed every test and still exited 1: pkill found nothing to stop.
    assert run_with_trap("true", 0) == 0


def test_a_failing_test_run_still_fails() -> None:
    assert run_with_trap("true", 3) == 3


def test_a_failed_background_build_does_not_change_the_exit_status() -> None:
    assert run_with_trap("exit 7", 0) == 0


def test_both_background_queues_are_stopped_when_the_tests_end_first(tmp_path: Path) -> None:
    marker = tmp_path / "still-running"
    assert run_with_trap(f"sleep 5 && touch {marker}", 0, wait=False) == 0
    subprocess.run(["sleep", "6"], check=True)
    assert not marker.exists()
