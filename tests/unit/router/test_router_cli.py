"""`kiln-router serve` refuses a command line it cannot route with before it starts anything."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kiln_router.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "either --service"),
        (["--service", "s", "--namespace", "n", "--endpoints", "h:1"], "either --service"),
        (["--service", "s"], "--service needs --namespace"),
        (["--endpoints", "h:1/v1"], "has a path"),
        (["--endpoints", "h:1", "--max-kv-usage", "0"], "--max-kv-usage"),
    ],
)
def test_a_bad_command_line_is_refused_with_its_reason(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2
    assert message in result.output
