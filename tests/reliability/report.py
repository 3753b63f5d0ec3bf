"""The reliability run's report: each scenario records what it tried and what was lost; the table
is printed at the end of the pytest run and written to `.kiln/reliability-report.md` (or
$KILN_RELIABILITY_REPORT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPORT_ENV = "KILN_RELIABILITY_REPORT"


@dataclass
class Row:
    """One scenario: its class (fault or input), how many cases ran, how many lost something."""

    scenario: str
    cases: int
    lost: int
    detail: str = ""


@dataclass
class Report:
    """Rows in the order the scenarios ran."""

    rows: list[Row] = field(default_factory=list)

    def record(self, scenario: str, cases: int, lost: int, detail: str = "") -> Row:
        row = Row(scenario, cases, lost, detail)
        self.rows.append(row)
        return row

    def table(self) -> str:
        lines = ["| scenario | cases | lost | what happened |", "| --- | ---: | ---: | --- |"]
        lines += [
            f"| {r.scenario} | {r.cases} | {r.lost} | {r.detail.replace('|', '/')} |" for r in self.rows
        ]
        return "\n".join(lines)

    def path(self, rootdir: Path) -> Path:
        return Path(os.environ.get(REPORT_ENV) or rootdir / ".kiln" / "reliability-report.md")

    def write(self, rootdir: Path) -> Path:
        target = self.path(rootdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("# Reliability run\n\n" + self.table() + "\n")
        return target


REPORT = Report()  # one per pytest process; the conftest's summary hook prints it
