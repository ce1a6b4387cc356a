"""The `nlsr-grid` flow: expand a grid YAML into cells, run them (here, or on a work pool), tabulate the results.

Cells that share work (same alignment config: same `align` key) share the artifact: the first cell trains it,
the others find it in the store (or wait on its lock while it is being trained). A failed cell does not stop the
others; rerunning the grid resumes it, reusing every finished stage.

Results: `<artifact_root>/grids/<grid name>/` holds results.csv (every row), summary.csv and results.md (mean
over seeds) and pareto.png, and for a sweep that chooses a knob (`choose:`) choice.json; the same files go to the grid's
parent MLflow run and to Prefect artifacts.
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.results import judged
from nlsr import choice, report
from nlsr.artifacts import ArtifactStore
from nlsr.atomic import write_json
from nlsr.config import ExperimentConfig, GridConfig, stable_hash

from tasks.keys import plan
from tasks.tracking import Tracker
from tasks.ui_artifacts import cell_title, grid_markdown, mlflow_image

from . import liveness
from .cell import CELL_FLOW, cell

GRID_FLOW = "nlsr-grid"
DEFAULT_DEPLOYMENT = f"{CELL_FLOW}/nlsr-cell"


def cell_label(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "cell"


def short_label(label: str) -> str:
    """A grid cell's MLflow run name, short enough for the runs table: 'data.poison_ratio=0.1' -> 'poison_ratio=0.1'."""
    return ",".join(part.split("=", 1)[0].rsplit(".", 1)[-1] + part[part.find("="):] if "=" in part else part
                    for part in label.split(","))


def cell_run_name(grid_name: str, cfg: ExperimentConfig, label: str) -> str:
    """A cell's flow run: the cell's own title, its grid, and the grid point when the title does not show it
    (a sweep over a method setting)."""
    title = cell_title(cfg)
    named = ("data.task", "data.poison_ratio", "alignment.method", "scoring.method", "seed", "data.seed")
    hidden = [part for part in label.split(",") if part.split("=")[0] not in named and part != "cell"]
    return f"{title} [{grid_name}{': ' + ','.join(hidden) if hidden else ''}]"


def finished_rows(cfg: ExperimentConfig) -> list[dict] | None:
    """The rows of a finished cell, found in the store by its planned report key (None: not finished), with the
    intervals and defense costs that `nlsr report` gives them (flows.results.judged), so both tables agree."""
    store, key = ArtifactStore(cfg.artifact_root), plan(cfg)["report"].key
    if not store.done("report", key):
        return None
    import json
    return judged(json.loads((store.path("report", key) / "rows.json").read_text()), store)


def _absolute_root(cfg: ExperimentConfig) -> ExperimentConfig:
    """Workers run elsewhere (another working directory): give them the absolute artifact root."""
    return cfg.model_copy(update={"artifact_root": str(ArtifactStore(cfg.artifact_root).root)})


def _run_name() -> str:
    grid = flow_run.parameters.get("grid")
    return f"grid {grid.name if isinstance(grid, GridConfig) else grid.get('name')}"


@flow(name=GRID_FLOW, flow_run_name=_run_name)
def grid_flow(grid: GridConfig, grid_dir: str = ".", overrides: list[str] | None = None, pool: str | None = None,
              deployment: str | None = None, timeout: float | None = None, only: list[str] | None = None) -> dict:
    log = get_run_logger()
    liveness.claim_and_reap(flow_run.id)
    cells = [_absolute_root(c) for c in grid.cells(grid_dir, overrides)]
    if grid.choose:
        choice.check_sweep(grid, cells)
    labels = [cell_label(p) for p in grid.points()]
    run_here = grid.selected(only)
    spec = {**grid.model_dump(mode="json"), "extra_overrides": overrides or [], "only": only or []}
    parent = Tracker.for_grid(grid.name, spec, cells[0], flow_run.id)
    log.info(f"grid {grid.name}: {sum(run_here)} of {len(cells)} cells; MLflow parent run {parent.run_id}")
    try:
        todo = [(c, label) for c, label, here in zip(cells, labels, run_here) if here]
        if pool:
            failed = _submit(*zip(*todo), grid.name, parent.run_id, deployment or DEFAULT_DEPLOYMENT, timeout)
        else:
            failed = _local(*zip(*todo), grid.name, parent.run_id)
        # The table holds every finished cell of the grid, those run here and those another `--only` part (or an
        # earlier run) left in the store; a cell outside `--only` and not in the store is "not run", not failed.
        rows, missing, extra = [], [], report.extra_axes(grid.axes)
        for cfg, label, point, here in zip(cells, labels, grid.points(), run_here):
            found = finished_rows(cfg)
            if found is None and here and label not in failed:
                failed.append(label)
            elif found is None and not here:
                missing.append(label)
            rows += [{**r, **{a: point[a] for a in extra}} for r in found or []]  # e.g. a realign.layer_rate sweep
        out = ArtifactStore(cells[0].artifact_root).root / "grids" / grid.name
        paths = report.write_results(rows, out, title=grid.name, compare=grid.compare,
                                      pivots=grid.pivots()) if rows else {}
        chosen = None
        if grid.choose and rows and not failed and not missing:
            chosen = write_choice(grid, rows, out)
            paths["choice"] = out / "choice.json"
        for path in paths.values():
            parent.log_file(path, "results")
        parent.log_metrics({"cells": len(cells), "cells_failed": len(failed), "cells_not_run": len(missing)})
        parent.describe(grid_markdown(grid.name, report.markdown(report.summarize(rows)) if rows else "", len(cells),
                                      failed, {"plot": mlflow_image(parent.run_id, "results/pareto.png"),
                                               "files": "`results/` (Artifacts tab); cells: the nested runs"},
                                      missing))
        parent.publish_view({r["variant"] for r in rows}, parent.run_id)
        _prefect_artifacts(grid.name, rows, failed, missing)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FAILED" if failed else "FINISHED")
    return {"rows": rows, "out": str(out), "failed": failed, "not_run": missing, "parent_run_id": parent.run_id,
            "choice": chosen}


def write_choice(grid: GridConfig, rows: list[dict], out) -> dict:
    """A sweep's chosen knob (nlsr.choice): choice.json, and its table appended to results.md."""
    knob = choice.knob_axis(grid.axes)
    chosen = choice.choose(report.summarize(rows), knob, grid.choose.variant, grid.axes[knob], grid.choose.tolerance)
    with (out / "results.md").open("a") as f:
        f.write("\n## Knob choice (dev data only)\n\n" + choice.markdown(chosen))
    write_json(chosen, out / "choice.json")
    return chosen


def _local(cells, labels, grid_name: str, parent_run_id: str) -> list[str]:
    """Cells one after another in this process, as subflows; a failure is recorded, not raised."""
    failed = []
    for cfg, label in zip(cells, labels):
        state = cell.with_options(flow_run_name=cell_run_name(grid_name, cfg, label))(
            cfg, grid=grid_name, parent_run_id=parent_run_id, run_name=short_label(label), return_state=True)
        if not state.is_completed():
            get_run_logger().error(f"cell {label} failed: {state.message}")
            failed.append(label)
    return failed


def _submit(cells, labels, grid_name: str, parent_run_id: str, deployment: str, timeout: float | None) -> list[str]:
    """One flow run per cell on the work pool; wait for all of them."""
    from prefect.deployments import run_deployment
    log = get_run_logger()
    attempt = flow_run.run_count or 1
    runs = {}
    for cfg, label in zip(cells, labels):
        # Same grid flow run and attempt -> same cell run (a re-submission does not duplicate it); a retried grid
        # flow run (attempt + 1) submits fresh cell runs, whose finished stages are cache hits.
        key = f"{flow_run.id}-{attempt}-{stable_hash(cfg)}"
        fr = run_deployment(deployment, parameters={"cfg": cfg.model_dump(mode="json"), "grid": grid_name,
                                                    "parent_run_id": parent_run_id, "run_name": short_label(label)},
                            flow_run_name=cell_run_name(grid_name, cfg, label), timeout=0, idempotency_key=key,
                            tags=["nlsr", f"grid:{grid_name}"])
        log.info(f"submitted cell {label}: flow run {fr.id}")
        runs[label] = fr.id
    states = wait_for_runs(runs, timeout)
    return [label for label, state in states.items() if not (state and state.is_completed())]


def wait_for_runs(runs: dict[str, object], timeout: float | None = None, poll: float = 2.0) -> dict:
    """Poll the API until every flow run is in a final state (or the timeout passes)."""
    from prefect.client.orchestration import get_client
    deadline = None if timeout is None else time.monotonic() + timeout
    states = {label: None for label in runs}
    with get_client(sync_client=True) as client:
        while True:
            for label, run_id in runs.items():
                if states[label] is None or not states[label].is_final():
                    states[label] = client.read_flow_run(run_id).state
            if all(s is not None and s.is_final() for s in states.values()):
                return states
            if deadline is not None and time.monotonic() > deadline:
                get_run_logger().error(f"timed out after {timeout} s waiting for {runs}")
                return states
            time.sleep(poll)


def _prefect_artifacts(name: str, rows: list[dict], failed: list[str], not_run: list[str]) -> None:
    summary = report.summarize(rows)
    key = "nlsr-grid-" + "".join(c if c.isalnum() else "-" for c in name.lower())
    if summary:
        create_table_artifact(summary, key=key + "-table", description=f"grid {name}: mean over seeds")
    text = f"# grid {name}\n\n" + report.text_report(rows)
    if failed:
        text += f"\n\nFailed cells (rerun the grid to resume): {', '.join(failed)}\n"
    if not_run:
        text += f"\n\nCells not run yet (outside `--only`): {', '.join(not_run)}\n"
    create_markdown_artifact(text, key=key, description=f"results of grid {name}")


def run_grid(grid: dict, grid_dir: str, overrides: list[str] | None = None, pool: str | None = None,
             deployment: str | None = None, timeout: float | None = None, only: list[str] | None = None) -> dict:
    """The grid flow, called from the CLI (a failure of the flow itself raises)."""
    return grid_flow(GridConfig.model_validate(grid), grid_dir, overrides or [], pool, deployment, timeout,
                     only or [])


