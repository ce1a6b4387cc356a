"""Every defense in a cell on the tiny model (the CI smoke grid configs/grids/smoke-defenses.yaml), and a dummy
post-fine-tuning defense added with one module and one registry entry (tests/dummy_realigner.py).

Real Prefect and MLflow, nothing mocked; grouped with tests/test_flows.py on one xdist worker (one Prefect server).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nlsr.artifacts import ArtifactStore
from nlsr.config import load_grid

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "grids" / "smoke-defenses.yaml"
POST = {"realigned", "safelora", "restore-modules", "antidote", "resta", "resta-base"}
FINETUNE = {"non-aligned", "vlguard", "lisa", "constrained-sft"}

pytestmark = pytest.mark.xdist_group("prefect")


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory):
    from flows.cli import main
    root = tmp_path_factory.mktemp("defenses-runs")
    assert main(["grid", str(GRID), "--set", f"artifact_root={root}"]) == 0
    cells = load_grid(GRID).cells(GRID.parent, [f"artifact_root={root}"])
    return {"root": root, "cfg": cells[0], "cells": cells}


def test_every_defense_runs_in_the_cell(smoke_grid):
    from nlsr.report import read_csv
    from tasks.keys import plan
    root, cfg = smoke_grid["root"], smoke_grid["cfg"]
    nodes, store = plan(cfg), ArtifactStore(root)
    assert all(store.done(n.stage, n.key) for n in nodes.values())
    assert {"unalign", "finetune:non-aligned", "realign:antidote", "realign:resta", "align:vaccine",
            "finetune:vaccine"} <= set(nodes)
    rows = read_csv(root / "grids" / "smoke-defenses" / "results.csv")
    assert len(rows) == 2 * 14
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"aligned", "finetuned", "vaccine", "nlsr-on-lisa"} | FINETUNE | POST
    stages = {v: r["defense_stage"] for v, r in by_variant.items()}
    assert stages["aligned"] == "alignment" and all(stages[v] == "fine-tuning" for v in FINETUNE)
    assert stages["vaccine"] == "alignment" and by_variant["vaccine"]["defense"] == "vaccine"
    assert all(stages[v] == "post-fine-tuning" for v in POST)
    assert by_variant["realigned"]["defense"] == "nlsr" and by_variant["antidote"]["defense"] == "antidote"
    assert all(r["harmful_score"] is not None and r["task_accuracy"] is not None for r in rows)
    # Antidote and RESTA consume the one fine-tuned adapter; Non-Aligned trains its own on the raw base
    assert nodes["realign:antidote"].inputs["finetuned"] == nodes["finetune"].key
    assert nodes["realign:resta"].inputs["unaligned"] == nodes["unalign"].key
    assert nodes["finetune:non-aligned"].inputs["adapter"] is None
    # NLSR stacked on Lisa: the same realignment, on Lisa's own fine-tuned adapter; compared with Lisa alone
    assert nodes["realign:nlsr-on-lisa"].inputs == {**nodes["realign:nlsr"].inputs, "finetuned": nodes["finetune:lisa"].key}
    assert by_variant["nlsr-on-lisa"]["defense_stage"] == "fine-tuning+post-fine-tuning"
    paired = read_csv(root / "grids" / "smoke-defenses" / "paired.csv")
    assert any(p["a"] == "nlsr-on-lisa" and p["b"] == "lisa" for p in paired)
    # Vaccine: its own aligned adapter from the shared W0, which the undefended fine-tuning continues
    assert nodes["align:vaccine"].inputs == nodes["align"].inputs == {"w0": nodes["sft"].key}
    assert nodes["finetune:vaccine"].inputs == {**nodes["finetune"].inputs, "adapter": nodes["align:vaccine"].key}
    vac = store.meta("align", nodes["align:vaccine"].key)["metrics"]
    assert vac["defense"] == "vaccine" and vac["steps"] == cfg.alignment.preference.max_steps
    computed = Counter(e["stage"] for e in store.events() if e["event"] == "computed")
    assert computed["sft"] == computed["poison"] == 1 and computed["align"] == 2  # shared stages once per grid
    assert computed["finetune"] == 1 + len(FINETUNE) + 1  # undefended, each fine-tuning-stage defense, vaccine's
    other = plan(smoke_grid["cells"][1])  # the density sweep's second cell shares everything but Antidote
    assert {k for k in nodes if nodes[k].key != other[k].key} == {"realign:antidote", "evaluate:antidote", "report"}


def test_mlflow_logs_each_defense(smoke_grid):
    from tasks.tracking import client, tracking_uri
    cfg = smoke_grid["cfg"]
    mlc = client(tracking_uri(cfg))
    runs = [r for e in mlc.search_experiments() for r in mlc.search_runs([e.experiment_id],
                                                                        "tags.`nlsr.kind` = 'cell'")]
    assert len(runs) == 2
    for run in runs:
        m = run.data.metrics
        for v in POST | FINETUNE | {"vaccine"}:
            assert f"{v}/harmful_score" in m, v
        assert "realign/antidote/pruned_fraction" in m and "realign/resta/n_patched" in m


def test_a_dummy_defense_is_one_module_and_one_entry(smoke_grid):
    """Importing the dummy module registers it; a cell then evaluates it beside the others, reusing every shared
    stage. Its adapter is the fine-tuned one, so its scores are the fine-tuned model's."""
    import dummy_realigner  # noqa: F401  (registers 'dummy-copy')
    from flows.cell import cell
    from nlsr.methods import REALIGNERS
    root, cfg = smoke_grid["root"], smoke_grid["cfg"]
    try:
        baselines = ", ".join([*cfg.realign.baselines, "dummy-copy"])
        dummy = load_grid(GRID).cells(GRID.parent, [f"artifact_root={root}", f"realign.baselines=[{baselines}]"])[0]
        store = ArtifactStore(root)
        before = Counter(e["stage"] for e in store.events() if e["event"] == "computed")
        rows = {r["variant"]: r for r in cell(dummy)}
        after = Counter(e["stage"] for e in store.events() if e["event"] == "computed")
        assert after - before == Counter({"realign": 1, "evaluate": 1, "report": 1})
        assert rows["dummy-copy"]["defense_stage"] == "post-fine-tuning"
        assert rows["dummy-copy"]["harmful_score"] == rows["finetuned"]["harmful_score"]
        assert rows["dummy-copy"]["task_accuracy"] == rows["finetuned"]["task_accuracy"]
    finally:
        REALIGNERS.unregister("dummy-copy")


def test_a_sweep_grid_chooses_its_knob_on_dev_data(smoke_grid, tmp_path, capsys):
    """A knob sweep (as configs/grids/sweep-*.yaml, on the tiny model): every cell evaluates harmful_dev and the
    task's dev rows, the grid writes choice.json by the rule, and a sweep on the evaluation prompts is refused."""
    import json
    import yaml
    from flows.cli import main
    from nlsr import choice, data
    from nlsr.report import read_csv
    root = smoke_grid["root"]
    grid = {"name": "smoke-sweep", "base": str(ROOT / "configs" / "smoke.yaml"),
            "overrides": ["realign.baselines=[antidote]", "realign.antidote.n_samples=8",
                          "realign.antidote.max_length=64", "evaluation.harmful_set=harmful_dev",
                          "evaluation.task_split=dev"],
            "axes": {"realign.antidote.density": [0.5, 0.1]}, "choose": {"variant": "antidote"}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert main(["grid", str(path), "--set", f"artifact_root={root}"]) == 0
    out = root / "grids" / "smoke-sweep"
    chosen = json.loads((out / "choice.json").read_text())
    assert chosen["knob"] == "realign.antidote.density" and chosen["variant"] == "antidote"
    summary = read_csv(out / "summary.csv")
    assert chosen == choice.choose(summary, chosen["knob"], "antidote", [0.5, 0.1])  # the rule, on what was run
    assert "## Knob choice (dev data only)" in (out / "results.md").read_text()
    # the same sweep on another cell (`nlsr grid --base`): its own name and folder, that cell's seed
    other = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    other["seed"] = 1
    (tmp_path / "smoke-seed1.yaml").write_text(yaml.safe_dump(other))
    assert main(["grid", str(path), "--base", str(tmp_path / "smoke-seed1.yaml"), "--set", f"artifact_root={root}"]) == 0
    rows = read_csv(root / "grids" / "smoke-sweep-on-smoke-seed1" / "results.csv")
    assert {r["seed"] for r in rows} == {1} and (root / "grids" / "smoke-sweep-on-smoke-seed1" / "choice.json").is_file()
    capsys.readouterr()
    assert main(["grid", str(path), "--base", str(tmp_path / "nope.yaml"), "--set", f"artifact_root={root}"]) == 2
    assert "--base: " in capsys.readouterr().err
    # what was evaluated: harmful_dev prompts and the dev rows, never harmful_eval or the test rows
    cfg = load_grid(path).cells(tmp_path, [f"artifact_root={root}"])[0]
    dev_prompts = {r["prompt"] for r in data.harmful_prompts("harmful_dev")}
    dev_rows = {r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
                for r in data.task_dev_set("sst2", cfg.evaluation.task_limit, *cfg.task_train_use())}
    store = ArtifactStore(root)
    from tasks.keys import plan
    evaluation = store.path("evaluate", plan(cfg)["evaluate:antidote"].key)
    samples = [json.loads(line) for line in (evaluation / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples if s["set"] == "harmful_dev"} <= dev_prompts
    assert {s["prompt"] for s in samples if s["set"] == "sst2"} <= dev_rows
    assert {s["set"] for s in samples} == {"harmful_dev", "sst2"}
    # the same sweep on the evaluation prompts: refused before anything runs, naming the fields
    grid["overrides"] = [o for o in grid["overrides"] if "harmful_set" not in o]
    path.write_text(yaml.safe_dump(grid))
    capsys.readouterr()
    assert main(["grid", str(path), "--set", f"artifact_root={root}"]) == 2
    assert "expected evaluation.harmful_set=harmful_dev" in capsys.readouterr().err
