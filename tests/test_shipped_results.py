"""The results this project publishes are what `nlsr report` makes of the rows shipped beside them, and the README
quotes them unchanged: a table edited by hand, or rows replaced without re-running the report, fails here."""
from __future__ import annotations

from pathlib import Path

from flows.results import file_rows
from nlsr import report

ROOT = Path(__file__).resolve().parent.parent
DEFENSES = ROOT / "docs" / "results" / "defenses"


def _tables(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| sst2 |")]


def test_defenses_results_are_the_report_of_their_rows(tmp_path):
    rows = file_rows([DEFENSES / "rows.jsonl"])
    assert {r["variant"] for r in rows} >= {"finetuned", "realigned", "resta", "vaccine", "nlsr-on-lisa"}
    again = report.write_results(rows, tmp_path)
    shipped = (DEFENSES / "results.md").read_text()
    assert again["markdown"].read_text() == shipped
    readme = (ROOT / "README.md").read_text()
    quoted = _tables(shipped)
    assert len(quoted) == len({r["variant"] for r in rows}) and all(line in readme for line in quoted)
