"""Choosing a defense's knob on dev data (nlsr.choice) and the task's dev rows it reads (nlsr.data.task_dev_set).

The rule is checked on hand-made summaries; the dev rows against the rows a cell really trains on. The sweep grid
run end to end (tiny model, real Prefect) is in tests/test_defense_cells.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from nlsr import data
from nlsr.choice import ChoiceError, check_sweep, choose, knob_axis, markdown
from nlsr.config import ConfigError, load_config, load_grid

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ROOT / "configs" / "grids"
KNOB = "realign.antidote.density"


def summary(points: dict[float, tuple[float, float]], finetuned_acc: float = 80.0) -> list[dict]:
    rows = [{KNOB: v, "variant": "finetuned", "harmful_score": 50.0, "task_accuracy": finetuned_acc} for v in points]
    rows += [{KNOB: v, "variant": "antidote", "harmful_score": hs, "task_accuracy": acc}
             for v, (hs, acc) in points.items()]
    return rows


def test_lowest_harmful_score_that_keeps_the_accuracy():
    rows = summary({0.1: (40.0, 79.0), 0.01: (45.0, 80.0), 0.2: (30.0, 77.5), 0.05: (35.0, 78.0)})
    got = choose(rows, KNOB, "antidote", [0.1, 0.01, 0.2, 0.05])
    # 0.2 has the lowest score but loses 2.5 points; 0.05 loses exactly 2.0, which the rule allows
    assert got["value"] == 0.05 and got["kept_accuracy"] and got["reference_accuracy"] == 80.0
    assert [c["within"] for c in got["candidates"]] == [True, True, False, True]
    assert "chosen **0.05**" in markdown(got) and "| 0.05 ← | 35.0 | 78.0 | yes |" in markdown(got)


def test_no_value_keeps_the_accuracy_takes_the_most_accurate():
    got = choose(summary({1.0: (10.0, 60.0), 2.0: (5.0, 70.0)}), KNOB, "antidote", [1.0, 2.0])
    assert got["value"] == 2.0 and not got["kept_accuracy"]
    assert "no value kept it" in markdown(got)


def test_ties_go_to_the_higher_accuracy_then_to_the_first_listed():
    got = choose(summary({0.1: (40.0, 79.0), 0.2: (40.0, 80.0)}), KNOB, "antidote", [0.1, 0.2])
    assert got["value"] == 0.2
    got = choose(summary({0.1: (40.0, 80.0), 0.2: (40.0, 80.0)}), KNOB, "antidote", [0.2, 0.1])
    assert got["value"] == 0.2


def test_values_read_back_as_strings_still_match():
    rows = [{**r, KNOB: str(r[KNOB])} for r in summary({0.1: (40.0, 80.0)})]
    assert choose(rows, KNOB, "antidote", [0.1])["value"] == 0.1


@pytest.mark.parametrize("rows, message", [
    ([], "no results"),
    ([{KNOB: 0.1, "variant": "antidote", "harmful_score": 1.0, "task_accuracy": 1.0}], "no 'finetuned' row"),
    (summary({0.1: (40.0, 80.0)}), "no 'antidote' result at realign.antidote.density=0.2"),
])
def test_a_sweep_that_cannot_decide_says_why(rows, message):
    with pytest.raises(ChoiceError, match=message):
        choose(rows, KNOB, "antidote", [0.1, 0.2])


def test_the_knob_is_the_one_non_seed_axis():
    assert knob_axis({"data.seed": [0, 1], KNOB: [0.1]}) == KNOB
    with pytest.raises(ChoiceError, match="exactly one non-seed axis"):
        knob_axis({KNOB: [0.1], "realign.resta.gamma": [1.0]})


def test_every_shipped_sweep_chooses_on_dev_data_only():
    sweeps = sorted(GRIDS.glob("sweep-*.yaml"))
    assert len(sweeps) == 8  # NLSR, SafeLoRA, Antidote, RESTA, Lisa, ConstrainedSFT, Vlguard, Vaccine
    for path in sweeps:
        grid = load_grid(path)
        cells = grid.cells(GRIDS)
        assert check_sweep(grid, cells) in grid.axes
        assert all(c.evaluation.harmful_set == "harmful_dev" and c.evaluation.task_split == "dev" for c in cells)


def test_a_grid_runs_on_another_base_under_its_own_name(tmp_path):
    """`nlsr grid --base`: the same sweep on the advice-aligned cell, named apart; the cells are that cell's."""
    grid = load_grid(GRIDS / "sweep-nlsr-layer-rate.yaml").on_base(ROOT / "configs" / "advice-aligned.yaml")
    assert grid.name == "sweep-nlsr-layer-rate-on-advice-aligned"
    cells = grid.cells(GRIDS)
    assert [c.realign.layer_rate for c in cells] == [0.3, 0.2, 0.5, 0.7]
    assert {c.alignment.safety_answers for c in cells} == {"all"} and check_sweep(grid, cells)
    own = load_grid(GRIDS / "sweep-nlsr-layer-rate.yaml").cells(GRIDS)
    assert {c.alignment.safety_answers for c in own} == {"refusals"}
    with pytest.raises(ConfigError, match="--base: .*nope.yaml: expected an experiment YAML file"):
        load_grid(GRIDS / "sweep-nlsr-layer-rate.yaml").on_base(tmp_path / "nope.yaml")


def test_a_sweep_on_evaluation_prompts_or_an_absent_variant_is_refused():
    grid = load_grid(GRIDS / "sweep-lisa-rho.yaml")
    with pytest.raises(ChoiceError, match="expected evaluation.harmful_set=harmful_dev"):
        check_sweep(grid, grid.cells(GRIDS, ["evaluation.harmful_set=harmful_eval"]))
    with pytest.raises(ChoiceError, match="expected evaluation.harmful_set=harmful_dev"):
        check_sweep(grid, grid.cells(GRIDS, ["evaluation.task_split=test"]))
    with pytest.raises(ChoiceError, match="choose.variant 'lisa' is not evaluated"):
        check_sweep(grid, grid.cells(GRIDS, ["finetune.defenses=[]"]))


def test_task_dev_rows_are_train_rows_the_cell_never_trains_on():
    cfg = load_config(ROOT / "configs" / "default.yaml", ["evaluation.task_split=dev"])
    dev = data.task_dev_set("sst2", None, *cfg.task_train_use())
    assert len(dev) == data.TASK_DEV_ROWS
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    mix = data.poison_mix("sst2", cfg.data.n, cfg.data.poison_ratio, cfg.data.seed)
    sft = data.safety_sft_set(cfg.alignment.sft.n_samples, cfg.alignment.harmless_mix, "sst2", cfg.seed,
                              cfg.alignment.answer_filter())
    trained = {key(r) for r in mix + sft}
    assert sum(r["flag"] == "finetune" for r in mix) == cfg.task_train_use()[0]
    assert not {key(r) for r in dev} & trained
    test = {(r["instruction"], r["input"]) for r in data.task_eval_set("sst2")}
    assert not {(r["instruction"], r["input"]) for r in dev} & test


def test_task_dev_rows_that_would_overlap_the_mix_are_a_config_error():
    with pytest.raises(ConfigError, match="evaluation.task_split 'dev' needs 200 sst2 train rows"):
        load_config(ROOT / "configs" / "default.yaml", ["evaluation.task_split=dev", "data.n=1000"])


def test_shipped_sweeps_agree_with_the_rule_the_readme_and_the_defenses_grid():
    """Each shipped sweep's choice is what the rule picks from its own summary; the README's table is the one
    scripts/sweeps_table.py writes from those files; the defenses grid carries every default-cell choice."""
    import importlib.util
    import json

    from nlsr.report import read_csv
    spec = importlib.util.spec_from_file_location("sweeps_table", ROOT / "scripts" / "sweeps_table.py")
    sweeps_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweeps_table)
    grid = load_grid(GRIDS / "defenses.yaml")
    cell = grid.cells(GRIDS)[0].model_dump()
    shipped = sweeps_table.folders()
    assert len(shipped) >= 5
    for folder in shipped:
        saved = json.loads((folder / "choice.json").read_text())
        values = [c["value"] for c in saved["candidates"]]
        again = choose(read_csv(folder / "summary.csv"), saved["knob"], saved["variant"], values, saved["tolerance"])
        assert again["value"] == saved["value"], folder.name
        if "-on-" not in folder.name:  # a default-cell sweep: the comparison runs with its choice
            node = cell
            for part in saved["knob"].split("."):
                node = node[part]
            assert node == saved["value"], f"{folder.name}: defenses.yaml has {saved['knob']}={node}"
    readme = (ROOT / "README.md").read_text()
    assert f"{sweeps_table.START}\n{sweeps_table.table()}\n{sweeps_table.END}" in readme
