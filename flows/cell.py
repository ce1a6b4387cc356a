"""The `nlsr-cell` flow: one task × poison ratio × alignment method × scorer × seed, as a DAG of cached stages.

    poison ─────────────────────────────────┐
    base ─► sft (W0) ─► align ─► reference ─► score ──┐
                          └──────► finetune ◄─┘        ▼
                                      └─► realign (nlsr + baselines) ─► evaluate (every variant) ─► report

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

from tasks.keys import plan, realign_methods, variant_name
from tasks.stages import bound
from tasks.tracking import Tracker
from tasks.ui_artifacts import artifact_key, cell_markdown, cell_title, headline_metrics, mlflow_image

from . import liveness

CELL_FLOW = "nlsr-cell"


def run_dag(cfg: ExperimentConfig, log=lambda label, ref: None) -> dict[str, Ref]:
    """Every stage of the cell, in order; returns the Refs by plan label. `log(label, ref)` after each stage."""
    t = bound(cfg.artifact_root)
    refs: dict[str, Ref] = {}

    def done(label: str, ref: Ref) -> Ref:
        refs[label] = ref
        log(label, ref)
        return ref

    base = t["base"](cfg)
    mix = done("poison", t["poison"](cfg))
    w0 = done("sft", t["sft"](cfg, base))
    aligned = done("align", t["align"](cfg, w0))
    # The aligned adapter sits on W0, except for method 'sft' (the SFT LoRA on the raw base): tasks.keys.plan too.
    wbase = base if cfg.alignment.method == "sft" else w0
    reference = done("reference", t["reference"](cfg, aligned))
    masks = done("score", t["score"](cfg, wbase, reference))
    if cfg.finetune.aligned:
        finetuned = done("finetune", t["finetune"](cfg, wbase, aligned, mix))
    else:  # 'Non-Aligned' baseline: a fresh LoRA on the raw base; there is nothing to realign
        finetuned = done("finetune", t["finetune"](cfg, base, None, mix))

    def evaluate(variant: str, on: Ref, adapter: Ref) -> Ref:
        task = t["evaluate"].with_options(task_run_name=f"evaluate-{variant}")
        return done(f"evaluate:{variant}", task(cfg, on, adapter))

    evals = {"aligned": evaluate("aligned", wbase, aligned),
             "finetuned": evaluate("finetuned", wbase if cfg.finetune.aligned else base, finetuned)}
    if cfg.finetune.aligned:
        for method in realign_methods(cfg):
            task = t["realign"].with_options(task_run_name=f"realign-{method}")
            realigned = done(f"realign:{method}", task(cfg, wbase, reference, finetuned,
                                                       masks if method == "nlsr" else None, method=method))
            v = variant_name(cfg, method)
            evals[v] = evaluate(v, wbase, realigned)
    done("report", t["report"](cfg, evals))
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
