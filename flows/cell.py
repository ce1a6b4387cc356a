"""The `nlsr-cell` flow: one task × poison ratio × alignment method × scorer × seed, as a DAG of cached stages.

The DAG is described once, in `nlsr.dag` (stages, inputs, config slices, variants); this flow walks it.
Stages run one after another as plain task calls (one cell = one process = one GPU); parallelism comes from
running several cells (grid flow, work pool). Each stage's Ref is logged to the cell's MLflow run right after it
returns, so a cached stage is logged too.
"""
from __future__ import annotations

import json

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from nlsr.artifacts import Ref
from nlsr.config import ExperimentConfig
from nlsr.env import offline_defaults

from nlsr.dag import steps

from tasks.keys import plan
from tasks.stages import bound
from tasks.tracking import Tracker
from tasks.ui_artifacts import artifact_key, cell_markdown, cell_title, headline_metrics, mlflow_image

from . import liveness

CELL_FLOW = "nlsr-cell"


def run_dag(cfg: ExperimentConfig, log=lambda label, ref: None) -> dict[str, Ref]:
    """Every step of the cell (nlsr.dag.steps), in order; returns the Refs by step label. `log(label, ref)` after
    each step."""
    t = bound(cfg.artifact_root)
    refs: dict[str, Ref] = {}
    produced = {"base": t["base"](cfg)}
    for step in steps(cfg):
        inputs = {name: produced[src] if src else None for name, src in step.inputs.items()}
        task = t[step.stage]
        if ":" in step.label:  # several steps of one stage: name each task run after its step
            task = task.with_options(task_run_name=step.label.replace(":", "-"))
        if step.stage == "report":
            ref = task(cfg, inputs)
        elif step.stage == "realign":
            ref = task(cfg, step.method, inputs)
        elif step.method is not None:
            ref = task(cfg, **inputs, method=step.method)
        else:
            ref = task(cfg, **inputs)
        produced[step.label] = refs[step.label] = ref
        log(step.label, ref)
    _check_plan(cfg, refs)
    return refs


def _check_plan(cfg: ExperimentConfig, refs: dict[str, Ref]) -> None:
    """The keys the tasks computed must be the keys tasks.keys.plan predicts (grids and reports rely on it)."""
    expected = {label: node.key for label, node in plan(cfg).items()}
    actual = {label: ref.key for label, ref in refs.items()}
    if expected != actual:
        diff = {k: (expected.get(k), actual.get(k)) for k in set(expected) | set(actual)
                if expected.get(k) != actual.get(k)}
        raise RuntimeError(f"internal error: stage keys differ from tasks.keys.plan: {diff}")


def read_rows(report: Ref) -> list[dict]:
    return json.loads(report.file("rows.json").read_text())


def _run_name() -> str:
    """The flow run's name: the cell (task, poison ratio, methods, seeds), not Prefect's random 'smoky-dove'."""
    cfg = flow_run.parameters.get("cfg")
    return cell_title(cfg if isinstance(cfg, ExperimentConfig) else ExperimentConfig.model_validate(cfg))


@flow(name=CELL_FLOW, flow_run_name=_run_name)
def cell(cfg: ExperimentConfig, grid: str | None = None, parent_run_id: str | None = None,
         run_name: str | None = None) -> list[dict]:
    """Run one experiment cell; returns the result rows (one per evaluated variant)."""
    offline_defaults()
    liveness.claim_and_reap(flow_run.id)
    tracker = Tracker.for_cell(cfg, grid, parent_run_id, flow_run.id, run_name)
    try:
        refs = run_dag(cfg, tracker.log_stage)
    except BaseException:
        tracker.finish("FAILED")
        raise
    rows = read_rows(refs["report"])
    wall = sum(float(r.metrics.get("wall_s") or 0) for r in refs.values())
    tracker.log_metrics({"wall_s/total": wall, **headline_metrics(rows)})
    tracker.describe(cell_markdown(cfg, rows, _mlflow_links(refs, tracker)))
    tracker.publish_view({r["variant"] for r in rows}, parent_run_id)
    tracker.finish("FINISHED")
    _prefect_artifact(cfg, rows, refs["report"], tracker)
    return rows


def _mlflow_links(refs: dict[str, Ref], tracker: Tracker) -> dict[str, str]:
    report = "report/results.md"
    realign = [label.replace(":", "/") + "/realign_report.json" for label in refs if label.startswith("realign:")]
    return {"plot": mlflow_image(tracker.run_id, "report/pareto.png"),
            "files (Artifacts tab)": ", ".join(f"`{p}`" for p in [report, *realign]),
            "artifact store": f"`{refs['report'].path}`"}


def _prefect_artifact(cfg: ExperimentConfig, rows: list[dict], report: Ref, tracker: Tracker) -> None:
    link = tracker.url()
    mlflow = f"[{tracker.run_id}]({link})" if link else f"`{tracker.run_id}` in {tracker.uri}"
    text = cell_markdown(cfg, rows, {"MLflow run": mlflow, "artifacts": f"`{report.path}`"})
    create_markdown_artifact(text, key=artifact_key(f"cell-{cell_title(cfg)}"),
                             description=f"results of cell {cell_title(cfg)}")
