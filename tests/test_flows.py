"""The cell and grid flows on the smoke config: whole DAG, cache hits, MLflow contents, shared alignment, report.

Runs real Prefect (a temporary local API server, one per test process) and MLflow (SQLite under the artifact
root); nothing is mocked. Grouped on one xdist worker with tests/test_resume.py so they share that server.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from nlsr.artifacts import ArtifactStore
from nlsr.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
VARIANTS = {"aligned", "finetuned", "realigned", "safelora", "restore-modules"}

pytestmark = pytest.mark.xdist_group("prefect")


def smoke(root: Path, *extra: str):
    return load_config(SMOKE, [f"artifact_root={root}", *extra])


def computed(store: ArtifactStore) -> Counter:
    return Counter((e["stage"], e["key"]) for e in store.events() if e["event"] == "computed")


def task_states(flow_state, expect: int = 0, timeout: float = 120.0) -> dict[str, str]:
    """Task-run name -> state name of a finished flow run. Prefect 3 records task runs from the client's event
    stream, asynchronously: on a busy machine the last ones land seconds after the flow returns, so wait (bounded)
    until `expect` task runs are recorded and none is still Pending/Running."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {r.name: r.state.name if r.state else "Pending" for r in runs}  # no state yet: not recorded
        settled = not {"Pending", "Running", "Scheduled"} & set(states.values())
        if (len(runs) >= expect and settled) or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


@pytest.fixture(scope="session")  # not module: xdist may interleave test_resume, which would rerun a module fixture
def first(tmp_path_factory):
    from flows.cell import cell
    root = tmp_path_factory.mktemp("flows-runs")
    cfg = smoke(root)
    t0 = time.perf_counter()
    state = cell(cfg, return_state=True)
    wall = time.perf_counter() - t0
    assert state.is_completed(), state.message
    return {"root": root, "cfg": cfg, "rows": state.result(), "wall": wall}


def test_cell_runs_the_whole_dag(first):
    from tasks.keys import plan
    store, nodes = ArtifactStore(first["root"]), plan(first["cfg"])
    assert {r["variant"] for r in first["rows"]} == VARIANTS
    assert all(r["harmful_score"] is not None and r["task_accuracy"] is not None for r in first["rows"])
    for r in first["rows"]:  # each score with its interval, and the per-prompt verdicts it comes from
        assert r["harmful_score_lo"] <= r["harmful_score"] <= r["harmful_score_hi"]
        assert r["task_accuracy_lo"] <= r["task_accuracy"] <= r["task_accuracy_hi"]
        assert len(r["verdicts"]["harmful_score"]) == r["n_harmful"]
        assert 100 * r["verdicts"]["harmful_score"].count("1") / r["n_harmful"] == pytest.approx(r["harmful_score"])
    assert all(store.done(n.stage, n.key) for n in nodes.values())
    assert len(nodes) == 15 and computed(store) == Counter({(n.stage, n.key): 1 for n in nodes.values()})
    report = store.path("report", nodes["report"].key)
    assert {"results.csv", "results.md", "pareto.png", "rows.json", "paired.csv"} <= {p.name for p in report.iterdir()}


def test_mlflow_holds_the_cell(first):
    from tasks.tracking import client, experiment_name, tracking_uri
    cfg = first["cfg"]
    mlc = client(tracking_uri(cfg))
    assert tracking_uri(cfg) == f"sqlite:///{first['root'] / 'mlflow.db'}"
    exp = mlc.get_experiment_by_name(experiment_name(cfg))
    (run,) = mlc.search_runs([exp.experiment_id], filter_string="tags.`nlsr.kind` = 'cell'")
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    for v in VARIANTS:
        assert f"{v}/harmful_score" in m and f"{v}/task_accuracy" in m
    assert m["sft/wall_s"] >= 0 and "realign/nlsr/n_patched" in m and "finetune/wall_s" in m
    # the headline metrics the runs table shows; per-factor statistics live in JSON files, not in 400 metrics
    rows = {r["variant"]: r for r in first["rows"]}
    assert {v: m[f"hs/{v}"] for v in VARIANTS} == {v: rows[v]["harmful_score"] for v in VARIANTS}
    assert {v: m[f"fa/{v}"] for v in VARIANTS} == {v: rows[v]["task_accuracy"] for v in VARIANTS}
    assert m["wall_s/total"] > 0 and not any("per_factor" in k or "by_category" in k for k in m), sorted(m)
    # ~75 stage numbers + hs/fa and their 95 % bounds per variant (5 × 6); was 627 before per-factor stats moved
    assert len(m) <= 110, len(m)
    note = tags["mlflow.note.content"]
    assert "harmful score ⬇" in note and "| restore-modules |" in note and "poison ratio | 0.1" in note
    exp_tags = mlc.get_experiment(exp.experiment_id).tags
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development"
    assert "metrics.`hs/realigned`" in json.loads(exp_tags["mlflow.sharedViewState.nlsr-results"])["selectedColumns"]
    assert len(mlc.get_metric_history(run.info.run_id, "sft/step_loss")) == cfg.alignment.sft.max_steps
    for tag in ("nlsr.config_hash", "git_commit", "version.torch", "version.prefect", "prefect.flow_run_id"):
        assert tags.get(tag), tag
    assert run.data.params["data.poison_ratio"] == "0.1"

    def files(path=None):
        out = []
        for a in mlc.list_artifacts(run.info.run_id, path):
            out += files(a.path) if a.is_dir else [a.path]
        return out
    names = set(files())
    assert {"config.json", "realign/nlsr/realign_report.json", "realigned/samples.jsonl",
            "report/pareto.png", "report/results.md", "score/stats.json"} <= names
    stats = json.loads(Path(mlc.download_artifacts(run.info.run_id, "score/stats.json")).read_text())
    assert stats["kept_per_factor"] and all(0 <= v <= 1 for v in stats["kept_per_factor"].values())


def test_second_run_is_all_cache_hits(first):
    from flows.cell import cell
    store = ArtifactStore(first["root"])
    before = computed(store)
    t0 = time.perf_counter()
    state = cell(first["cfg"], return_state=True)
    wall = time.perf_counter() - t0
    assert state.is_completed() and state.result() == first["rows"]
    assert computed(store) == before
    states = task_states(state, expect=16)  # 15 stages + the raw base
    stages = {name: s for name, s in states.items() if not name.startswith("base")}
    assert len(stages) == 15 and set(stages.values()) == {"Completed"}, states
    hits = [e for e in store.events() if e["event"] == "hit"]
    assert len(hits) >= 15  # every stage reused through the artifact store (and its integrity check)
    print(f"first run {first['wall']:.1f} s, cached rerun {wall:.1f} s")
    assert wall < first["wall"]


def test_prefect_names_runs_after_the_cell_and_keeps_its_results(first):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from tasks.ui_artifacts import cell_title
    title = cell_title(first["cfg"])
    assert title == "sst2 p=0.1 dpo/lowrank seed=0"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[title])))
        # other tests (other xdist workers, same Prefect database) run cells with this title too: keep this
        # process's runs, which `first` and the cached rerun made
        mine = [r for r in runs if r.infrastructure_pid == f"{socket.gethostname()}:{os.getpid()}"]
        assert mine, [r.infrastructure_pid for r in runs]
        artifacts = client.read_artifacts()
    ours = {r.id for r in mine}
    texts = [a.data for a in artifacts if a.flow_run_id in ours and a.type == "markdown"]
    assert any("harmful score ⬇" in t and "| restore-modules |" in t for t in texts), texts


def test_a_run_whose_process_died_is_marked_crashed_by_the_next(first):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from flows.cell import cell

    @flow(name="ghost")
    def ghost():
        pass

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with get_client(sync_client=True) as client:
        dead = client.create_flow_run(ghost, name="killed-cell", state=Running())
        live = client.create_flow_run(ghost, name="live-cell", state=Running())
        client.update_flow_run(dead.id, infrastructure_pid=f"{socket.gethostname()}:{gone.pid}")
        client.update_flow_run(live.id, infrastructure_pid=f"{socket.gethostname()}:{os.getpid()}")
    assert cell(first["cfg"], return_state=True).is_completed()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(dead.id).state.type.value == "CRASHED"
        assert client.read_flow_run(live.id).state.type.value == "RUNNING"  # its process is alive
        client.set_flow_run_state(live.id, Completed(), force=True)  # leave no Running run behind


class Planted:
    """A pickle payload: unpickling it creates `marker` (stands for any code an attacker plants)."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_prefect_result_is_never_unpickled(first, tmp_path):
    """Issue 11 row 9: a file planted where Prefect kept task results (and cache keys) used to be unpickled on the
    next cache hit. Prefect now persists no task result: the artifact store is the only cache."""
    import pickle
    from flows.cell import cell
    from tasks.keys import plan
    store = ArtifactStore(first["root"])
    before = computed(store)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Planted(marker))
    for folder in ("results", "cache-keys", "storage"):
        d = first["root"] / ".prefect" / folder
        d.mkdir(parents=True, exist_ok=True)
        for node in plan(first["cfg"]).values():
            (d / f"{node.stage}-{node.key}").write_bytes(payload)
            (d / node.key).write_bytes(payload)
    state = cell(first["cfg"], return_state=True)
    assert state.is_completed() and state.result() == first["rows"]
    assert computed(store) == before  # nothing recomputed: _SUCCESS is the truth
    assert not marker.exists()
    shutil.rmtree(first["root"] / ".prefect")


def test_deleted_artifact_is_recomputed_alone(first):
    from flows.cell import cell
    from tasks.keys import plan
    store = ArtifactStore(first["root"])
    key = plan(first["cfg"])["report"].key
    before = computed(store)
    shutil.rmtree(store.path("report", key))  # its Prefect cache record is now stale
    assert cell(first["cfg"], return_state=True).is_completed()
    assert computed(store) - before == Counter({("report", key): 1})


def _damaged_rerun(first, damage) -> tuple[Path, list[dict]]:
    """Damage the fine-tuned adapter of the first cell with `damage(file)`, run the cell again."""
    from flows.cell import cell
    from tasks.keys import plan
    store = ArtifactStore(first["root"])
    key = plan(first["cfg"])["finetune"].key
    adapter = store.path("finetune", key) / "adapter_model.safetensors"
    good = adapter.read_bytes()
    damage(adapter, good)
    before = computed(store)
    state = cell(first["cfg"], return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == first["rows"]  # healed: recomputed, same (deterministic) results
    assert computed(store) - before == Counter({("finetune", key): 1})  # that stage alone
    assert adapter.read_bytes() == good
    (event,) = [e for e in store.events() if e["event"] == "damaged" and e["key"] == key][-1:]
    aside = Path(event["moved_to"])
    assert aside.parent == store.root / "finetune" and aside.name.startswith(".damaged-")
    return aside, event["problems"]


def test_truncated_artifact_is_moved_aside_and_recomputed(first):
    """Issue 11 row 1: a truncated adapter used to be a silent cache hit; the stage that read it failed."""
    aside, problems = _damaged_rerun(first, lambda f, good: f.write_bytes(good[: len(good) // 2]))
    size = (aside / "adapter_model.safetensors").stat().st_size
    assert problems == [f"adapter_model.safetensors has {size} bytes, {2 * size} recorded"]


def test_garbage_in_an_adapter_is_caught_by_its_hash(first):
    """Issue 11 row 2: same-size garbage after a valid safetensors header made a NaN adapter, empty answers and a
    harmful score of 0, cached under its key. The hash recorded in _SUCCESS catches it on the next hit."""
    def garble(f: Path, good: bytes):
        header = 8 + int.from_bytes(good[:8], "little")
        f.write_bytes(good[:header] + b"\xff" * (len(good) - header))
    aside, problems = _damaged_rerun(first, garble)
    assert problems == ["adapter_model.safetensors content differs from its recorded hash"]


def test_cell_with_reference_calibration(first):
    """scoring.calibration=reference: the reference model answers, the judge filters, the rest is shared."""
    from flows.cell import cell
    from nlsr.calibration import CALIBRATION_FILE
    from nlsr.data import read_jsonl
    from tasks.keys import plan
    # the tiny model cannot refuse, so the keyword judge would flag every answer; the classifier keeps some
    cfg = smoke(first["root"], "scoring.calibration=reference", "evaluation.judge=classifier")
    state = cell(cfg, return_state=True)
    assert state.is_completed(), state.message
    store, nodes, shipped = ArtifactStore(first["root"]), plan(cfg), plan(first["cfg"])
    assert nodes["align"].key == shipped["align"].key and nodes["score"].key != shipped["score"].key
    saved = read_jsonl(store.path("score", nodes["score"].key) / CALIBRATION_FILE)
    m = store.meta("score", nodes["score"].key)["metrics"]
    assert m["calibration"] == "reference" and m["calibration_answered"] == len(saved) == 2 * cfg.scoring.n_samples
    assert m["calibration_safe"] == sum(1 for s in saved if s["response"] and not s["harmful"]) > 0
    assert m["n_samples"] == min(cfg.scoring.n_samples, m["calibration_safe"])
    assert {r["variant"] for r in state.result()} == VARIANTS


def test_grid_shares_alignment_and_reports(first, capsys):
    from flows.cli import main
    from tasks.keys import plan
    root = first["root"]
    grid = {"name": "pair", "base": str(SMOKE), "overrides": [f"artifact_root={root}"],
            "axes": {"data.poison_ratio": [0.1, 0.2]}}
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert main(["grid", str(path)]) == 0
    store = ArtifactStore(root)
    cells = [smoke(root, f"data.poison_ratio={p}") for p in (0.1, 0.2)]
    plans = [plan(c) for c in cells]
    assert plans[0]["align"].key == plans[1]["align"].key and plans[0]["finetune"].key != plans[1]["finetune"].key
    counts = computed(store)
    for stage in ("sft", "align", "reference", "score"):
        assert counts[(stage, plans[0][stage].key)] == 1, stage  # trained once, shared by both cells
    assert counts[("finetune", plans[1]["finetune"].key)] == 1
    out = root / "grids" / "pair"
    from nlsr.report import read_csv
    rows = read_csv(out / "results.csv")
    assert len(rows) == 10 and {r["poison_ratio"] for r in rows} == {0.1, 0.2}
    assert {r["data_seed"] for r in rows} == {cells[0].data.seed}  # the shuffle seed is in every row
    assert (out / "pareto.png").stat().st_size > 0 and (out / "results.md").is_file()
    # the grid's table carries each defense's cost, as `nlsr report`'s does
    assert all(r["defense_s"] > 0 for r in read_csv(out / "summary.csv") if r["variant"] == "realigned")
    assert "defense cost (s)" in (out / "results.md").read_text()

    capsys.readouterr()
    assert main(["report", "--root", str(root), "--experiment", "nlsr/pair"]) == 0
    text = capsys.readouterr().out
    assert "harmful score ⬇" in text and "restore-modules" in text and "10 rows" in text
    assert "realigned − finetuned" in text and "p (exact McNemar)" in text and "Wilson" in text
    assert (root / "reports" / "nlsr-pair" / "pareto.png").is_file()
    assert main(["report", "--root", str(root)]) == 0  # every finished cell under the root
    assert (root / "reports" / "all" / "results.csv").is_file()


def test_grid_only_runs_part_and_its_rows_merge(first, capsys):
    """`nlsr grid --only AXIS=VALUE` runs the selected cells; the table holds every finished cell of the grid and
    names the cells not run yet; its rows.jsonl rebuilds the same table with `nlsr report --rows`."""
    from flows.cli import main
    from nlsr.report import read_csv
    from tasks.keys import plan
    root = first["root"]
    grid = {"name": "parts", "base": str(SMOKE), "overrides": [f"artifact_root={root}"],
            "axes": {"data.poison_ratio": [0.1, 0.2, 0.05]}}
    path = root / "parts.yaml"
    path.write_text(yaml.safe_dump(grid))
    capsys.readouterr()
    assert main(["grid", str(path), "--only", "data.poison_ratio=0.3"]) == 2  # refused before anything runs
    assert "--only data.poison_ratio=0.3: expected one of the values of axes.data.poison_ratio" in \
        capsys.readouterr().err
    before = computed(ArtifactStore(root))
    assert main(["grid", str(path), "--only", "data.poison_ratio=0.1", "--only", "data.poison_ratio=0.2"]) == 0
    printed = capsys.readouterr().out
    assert "running the 2 with" in printed and "1 cell(s) not run yet (outside --only): ['data.poison_ratio=0.05']" \
        in printed
    assert not ArtifactStore(root).done("finetune", plan(smoke(root, "data.poison_ratio=0.05"))["finetune"].key)
    assert {stage for stage, _ in computed(ArtifactStore(root)) - before} <= {"report"}  # the pair grid's cells
    out = root / "grids" / "parts"
    assert {r["poison_ratio"] for r in read_csv(out / "results.csv")} == {0.1, 0.2}
    from mlflow.tracking import MlflowClient
    mlc = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (parent,) = mlc.search_runs([mlc.get_experiment_by_name("nlsr/parts").experiment_id],
                                filter_string="tags.`nlsr.kind` = 'grid'")
    assert parent.data.metrics["cells_not_run"] == 1 and parent.data.metrics["cells_failed"] == 0
    assert "Cells not run yet (outside `--only`): data.poison_ratio=0.05" in parent.data.tags["mlflow.note.content"]
    assert main(["report", "--rows", str(out / "rows.jsonl"), "--out", str(root / "reports" / "parts")]) == 0
    assert read_csv(root / "reports" / "parts" / "summary.csv") == read_csv(out / "summary.csv")
    assert read_csv(root / "reports" / "parts" / "paired.csv") == read_csv(out / "paired.csv")


def test_a_sweep_grid_reports_each_value(first, capsys):
    """A grid over a method parameter: each value is its own summary row (in the grid's table and in `nlsr
    report --experiment`), and only the stages that read it are recomputed."""
    from flows.cli import main
    from nlsr.report import read_csv
    from tasks.keys import plan
    root = first["root"]
    grid = {"name": "sweep", "base": str(SMOKE), "overrides": [f"artifact_root={root}"],
            "axes": {"realign.layer_rate": [0.3, 0.5]}, "compare": {"realign.layer_rate": 0.5},
            "pivot": "realign.layer_rate"}
    (root / "sweep.yaml").write_text(yaml.safe_dump(grid))
    before = computed(ArtifactStore(root))
    assert main(["grid", str(root / "sweep.yaml")]) == 0
    new = computed(ArtifactStore(root)) - before
    assert {stage for stage, _ in new} <= {"realign", "evaluate", "report"}  # training and scoring reused
    rates = [smoke(root, f"realign.layer_rate={r}") for r in (0.3, 0.5)]
    assert plan(rates[0])["realign:safelora"].key == plan(rates[1])["realign:safelora"].key  # τ only: shared
    assert plan(rates[0])["realign:nlsr"].key != plan(rates[1])["realign:nlsr"].key
    summary = read_csv(root / "grids" / "sweep" / "summary.csv")
    realigned = [r for r in summary if r["variant"] == "realigned"]
    assert sorted(r["realign.layer_rate"] for r in realigned) == [0.3, 0.5]
    assert all(r["n_seeds"] == 1 for r in realigned)
    capsys.readouterr()
    assert main(["report", "--root", str(root), "--experiment", "nlsr/sweep"]) == 0
    text = capsys.readouterr().out
    assert "| realign.layer_rate |" in text and text.count("| realigned |") == 2
    # compare: the same variant across the swept knob, paired on the prompts; what P_L does not reach is left out
    across = read_csv(root / "grids" / "sweep" / "across-realign.layer_rate.csv")
    assert {(r["a"], r["b"]) for r in across} >= {("realigned (0.3)", "realigned (0.5)")}
    assert not {r["variant"] for r in across} & {"aligned", "finetuned", "safelora"}
    assert "Across realign.layer_rate: each value against 0.5" in (root / "grids" / "sweep" / "results.md").read_text()
    # pivot: the paper's layout, one column per value in the grid's order
    glance = read_csv(root / "grids" / "sweep" / "pivot-realign.layer_rate.csv")
    assert list(glance[0]) == ["row", "metric", "0.3", "0.5", "mean"]
    assert {"realigned: harmful score", "safelora: task accuracy"} <= {r["row"] for r in glance}
    assert main(["report", "--root", str(root), "--experiment", "nlsr/sweep", "--compare",
                 "realign.layer_rate=0.5"]) == 0
    assert "realigned (0.3) − realigned (0.5)" in capsys.readouterr().out
    assert main(["report", "--root", str(root), "--experiment", "nlsr/sweep", "--compare", "scoring.nope=1"]) == 2
    assert "--compare scoring.nope: not a column" in capsys.readouterr().err


def test_retries_transient_errors_but_not_oom():
    import torch
    from prefect import flow, task

    from tasks.policy import retry_transient
    attempts = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky(kind: str) -> str:
        attempts.append(kind)
        if attempts.count(kind) == 1:
            raise {"io": OSError("shared volume hiccup"), "oom": torch.OutOfMemoryError("CUDA out of memory")}[kind]
        return "ok"

    @flow
    def run(kind: str):
        return flaky(kind, return_state=True)

    assert run("io", return_state=True).is_completed() and attempts.count("io") == 2
    assert run("oom", return_state=True).is_failed() and attempts.count("oom") == 1
