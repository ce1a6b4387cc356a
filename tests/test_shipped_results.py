"""The results this project publishes are what `nlsr report` makes of the rows shipped beside them, and the README
quotes them unchanged: a table edited by hand, or rows replaced without re-running the report, fails here."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.results import file_rows
from nlsr import reading, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
# folder -> variants it must hold (a shipped table that lost its defenses or its realigned rows is caught) and the
# `nlsr report --compare` and `--pivot` it was made with
SHIPPED = {"default-seeds": ({"aligned", "finetuned", "realigned", "restore-modules"}, {}, {}),
           "table5-scorers": ({"aligned", "finetuned", "realigned"}, {"scoring.method": "lowrank"},
                              {"scoring.method": ["lowrank", "wanda", "snip", "random"]}),
           "diagnose-orpo": ({"aligned", "finetuned", "realigned", "restore-modules"}, {}, {}),
           "diagnose-orpo-density": ({"aligned", "finetuned", "realigned", "restore-modules"}, {}, {}),
           "default-seeds-on-quick": ({"aligned", "finetuned", "realigned"}, {}, {}),
           "tune-quick": ({"aligned", "finetuned", "realigned"}, {}, {"finetune.learning_rate": None}),
           "defenses": ({"finetuned", "realigned", "resta", "vaccine", "nlsr-on-lisa"}, {}, {}),
           "table1-poison-ratio": ({"aligned", "finetuned", "realigned"}, {}, {"data.poison_ratio": None}),
           "table2-alignment": ({"aligned", "finetuned", "realigned"}, {"alignment.method": "dpo"},
                                {"alignment.method": ["sft", "dpo", "orpo", "kto", "simpo"]}),
           "calibration": ({"aligned", "finetuned", "realigned", "restore-modules"}, {"scoring.calibration": "safe"},
                           {}),
           "table3-tasks": ({"aligned", "finetuned", "realigned", "restore-modules"}, {},
                            {"data.task": ["sst2", "agnews", "gsm8k"]})}
# folder -> the shipped folder whose rows it re-scores by the read labels in that folder's reading.jsonl
BY_READING = {"default-seeds-by-reading": "default-seeds"}


def _table(markdown: str) -> list[str]:
    """The summary table's rows (they start with the task)."""
    return [line for line in markdown.splitlines() if line.startswith(("| sst2 |", "| agnews |", "| gsm8k |"))]


def test_every_folder_with_rows_is_checked():
    assert {p.parent.name for p in RESULTS.glob("*/rows.jsonl")} == set(SHIPPED) | set(BY_READING)


@pytest.mark.parametrize("folder", sorted(SHIPPED))
def test_shipped_results_are_the_report_of_their_rows(folder, tmp_path):
    variants, compare, pivots = SHIPPED[folder]
    rows = file_rows([RESULTS / folder / "rows.jsonl"])
    assert {r["variant"] for r in rows} >= variants
    again = report.write_results(rows, tmp_path, compare=compare, pivots=pivots)
    shipped = (RESULTS / folder / "results.md").read_text()
    assert again["markdown"].read_text() == shipped
    readme = (ROOT / "README.md").read_text()
    quoted = _table(shipped)
    summary = report.summarize(rows)  # one table row per cell variant (a grid's own axes included), seeds pooled
    assert len(quoted) == len(summary) and all(line in readme for line in quoted)
    for axis, order in pivots.items():  # the paper-layout table, quoted whole
        glance = report.pivot_markdown(report.pivot(summary, axis, order, report.paired(rows)))
        assert glance in shipped and glance in readme


@pytest.mark.parametrize("folder", sorted(BY_READING))
def test_results_by_reading_are_the_report_of_the_read_labels(folder, tmp_path):
    """`nlsr report --rows <source>/rows.jsonl --labels <source>/reading.jsonl --out <folder>`, run from the
    repository root, made the shipped folder; the README quotes its table and the judge-against-reading table."""
    source = BY_READING[folder]
    rows = file_rows([RESULTS / source / "rows.jsonl"])
    labels_file = f"docs/results/{source}/reading.jsonl"
    labels = reading.load_labels(ROOT / labels_file)
    assert set(labels) == {r["eval_key"] for r in rows}  # every evaluation of the table was read
    appendix = reading.appendix(rows, labels, labels_file)
    again = report.write_results(reading.relabel(rows, labels), tmp_path, title="Harmful scores by reading",
                                 appendix=appendix)
    shipped = (RESULTS / folder / "results.md").read_text()
    assert again["markdown"].read_text() == shipped
    readme = (ROOT / "README.md").read_text()
    judge_rows = [line for line in appendix.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(judge_rows) == 4 and all(line in readme for line in _table(shipped) + judge_rows)
