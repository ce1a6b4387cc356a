"""What a researcher meets in the MLflow and Prefect UIs: run titles, the results as Markdown, a handful of
well-named metrics, and the experiment settings that make MLflow open on the runs table with those metrics shown.

Why a module of its own: the UIs show what the tracking code writes, and MLflow 3.x decides a lot from tags.
- `mlflow.experimentKind` = `custom_model_development`: without it, MLflow 3.17 opens an experiment on its GenAI
  "Overview" page (traces, token usage: all empty for us) instead of the training-runs table.
- `mlflow.note.content` (on a run or an experiment): the description shown on its page, rendered as Markdown.
- `mlflow.sharedViewState.<key>` on the experiment: a saved runs-table view (columns, sort, expanded parents);
  the URL `#/experiments/<id>/runs?viewStateShareKey=<key>` opens it. MLflow's default table shows no metric
  column at all, so this view is how the harmful scores appear in the runs list without clicking.
- Headline metrics `hs/<variant>` (harmful score, lower is better) and `fa/<variant>` (fine-tuning task accuracy,
  the paper's FA), plus `hs_lo/`, `hs_hi/`, `fa_lo/`, `fa_hi/` when the result rows carry 95 % interval bounds:
  short names that fit a column header and group in the chart view.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable

from nlsr.config import ExperimentConfig
from nlsr.report import variant_rank

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow UI: the "machine learning" (runs table) experiment page
NOTE_TAG = "mlflow.note.content"
PRIMARY_METRIC_TAG, PRIMARY_METRIC = "mlflow.experiment.primaryMetric.name", "hs/realigned"
VIEW_KEY = "nlsr-results"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
HEADLINE = {"harmful_score": "hs", "task_accuracy": "fa"}
# Stages whose metrics are mostly detail: only these become MLflow metrics (`nlsr report` reads the first two).
STAGE_METRICS = {"evaluate": ("harmful_score", "task_accuracy", "wall_s")}
# Interval bounds of a result row, whatever the report names them: harmful_score_lo, harmful_hi, accuracy_ci_high...
_BOUND = re.compile(r"^(harmful_score|harmful|task_accuracy|accuracy)_(?:ci_)?(lo|low|lower|hi|high|upper)$")


# --------------------------------------------------------------------------------------------- names

def cell_title(cfg: ExperimentConfig) -> str:
    """A cell as a person names it: task, poison ratio, methods, seeds (flow runs and stand-alone MLflow runs)."""
    seed = f"seed={cfg.seed}" + (f" data_seed={cfg.data.seed}" if cfg.data.seed != cfg.seed else "")
    method = cfg.alignment.method + "/" + cfg.scoring.method
    if cfg.realign.method != "nlsr":
        method += "/" + cfg.realign.method
    return f"{cfg.data.task} p={cfg.data.poison_ratio:g} {method} {seed}"


def artifact_key(text: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")


# --------------------------------------------------------------------------------------------- metrics

def bounds(row: dict) -> dict[str, float]:
    """The row's interval bounds as {'hs_lo': .., 'hs_hi': .., 'fa_lo': .., 'fa_hi': ..} (empty without them)."""
    out = {}
    for key, value in row.items():
        m = _BOUND.match(key)
        if m and value is not None:
            short = "hs" if m.group(1).startswith("harmful") else "fa"
            out[f"{short}_{'lo' if m.group(2) in ('lo', 'low', 'lower') else 'hi'}"] = float(value)
    return out


def headline_metrics(rows: Iterable[dict]) -> dict[str, float]:
    """hs/<variant>, fa/<variant> (and their interval bounds when the rows have them) of one cell's rows."""
    out = {}
    for r in rows:
        v = r["variant"]
        for field, short in HEADLINE.items():
            if r.get(field) is not None:
                out[f"{short}/{v}"] = float(r[field])
        out.update({f"{name}/{v}": value for name, value in bounds(r).items()})
    return out


def split_stage_metrics(metrics: dict, stage: str = "") -> tuple[dict[str, float], dict[str, Any]]:
    """A stage's metrics as (scalars worth a metric, statistics for a JSON artifact). Dicts (per-factor mask
    fractions, per-category harmful scores, the trainer's final numbers) would become hundreds of metrics; an
    evaluation's counts and sub-timings (five variants of them) go to the JSON file as well."""
    keep = STAGE_METRICS.get(stage)
    scalars, stats = {}, {}
    for k, v in metrics.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if number and (keep is None or k in keep):
            scalars[k] = v
        elif number or isinstance(v, dict):
            stats[k] = v
    return scalars, stats


# --------------------------------------------------------------------------------------------- markdown

def _fmt(x) -> str:
    if x is None:
        return ""
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _with_interval(value, lo, hi) -> str:
    text = _fmt(value)
    return f"{text} [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else text


def results_table(rows: list[dict]) -> str:
    """variant | harmful score ⬇ | task accuracy ⬆, with [95 % interval] when the rows carry one."""
    lines = ["| variant | harmful score ⬇ | task accuracy ⬆ |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: variant_rank(r["variant"])):
        b = bounds(r)
        lines.append(f"| {r['variant']} | {_with_interval(r.get('harmful_score'), b.get('hs_lo'), b.get('hs_hi'))} "
                     f"| {_with_interval(r.get('task_accuracy'), b.get('fa_lo'), b.get('fa_hi'))} |")
    note = "\n\n95 % intervals in brackets." if any(bounds(r) for r in rows) else ""
    return "\n".join(lines) + note + "\n"


def settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings a reader needs to place a cell (the rest is in the run's params / config.json)."""
    return {"task": cfg.data.task, "poison ratio": cfg.data.poison_ratio, "rows (n)": cfg.data.n,
            "alignment": cfg.alignment.method, "scorer": f"{cfg.scoring.method} (sparsity {cfg.scoring.sparsity})",
            "realign": f"{cfg.realign.method} (layer rate {cfg.realign.layer_rate}, ε {cfg.realign.epsilon})",
            "baselines": ", ".join(cfg.realign.baselines) or "none", "model": cfg.model.source,
            "judge": cfg.evaluation.judge, "seed / data seed": f"{cfg.seed} / {cfg.data.seed}"}


def cell_markdown(cfg: ExperimentConfig, rows: list[dict], links: dict[str, str] | None = None) -> str:
    """The cell's page: results table, key settings, where the rest is."""
    parts = [f"## {cell_title(cfg)}\n", results_table(rows), "| setting | value |\n|---|---|"]
    parts[-1] += "".join(f"\n| {k} | {v} |" for k, v in settings(cfg).items())
    if links:
        parts.append("\n".join(f"- {name}: {where}" for name, where in links.items()))
    return "\n\n".join(parts) + "\n"


def grid_markdown(name: str, summary_table: str, n_cells: int, failed: list[str],
                  links: dict[str, str] | None = None, not_run: list[str] | None = None) -> str:
    text = f"## grid {name}: {n_cells} cells\n\n{summary_table}"
    if failed:
        text += f"\nFailed cells (rerun the grid to resume them): {', '.join(failed)}\n"
    if not_run:
        text += f"\nCells not run yet (outside `--only`): {', '.join(not_run)}\n"
    if links:
        text += "\n" + "\n".join(f"- {k}: {v}" for k, v in links.items()) + "\n"
    return text


def mlflow_image(run_id: str, path: str) -> str:
    """Markdown that shows a run's image artifact inside a description (the MLflow server's artifact endpoint,
    relative to the UI's address)."""
    return f"![{path}](get-artifact?path={path}&run_uuid={run_id})"


# --------------------------------------------------------------------------------------------- experiment

def view_state(variants: Iterable[str], expand: Iterable[str] = ()) -> dict:
    """The runs-table view saved on the experiment: harmful score then accuracy per variant, newest first, grid
    parents expanded (their cells nested below)."""
    ordered = sorted(set(variants), key=variant_rank)
    columns = [f"metrics.`{short}/{v}`" for short in HEADLINE.values() for v in ordered]
    columns.append("metrics.`wall_s/total`")
    return {"selectedColumns": columns, "columnOrder": columns, "orderByKey": "attributes.start_time",
            "orderByAsc": False, "runsExpanded": {run_id: True for run_id in expand}}


def set_tag(client, experiment_id: str, key: str, value: str) -> None:
    """set_experiment_tag, safe when two runs tag a fresh experiment at once: MLflow's SQL store inserts a new tag,
    and the second insert fails on the unique key; by then the tag exists, and setting it again updates it."""
    from mlflow.exceptions import MlflowException
    try:
        client.set_experiment_tag(experiment_id, key, value)
    except MlflowException as err:
        if "UNIQUE constraint" not in str(err):
            raise
        client.set_experiment_tag(experiment_id, key, value)


def prepare_experiment(client, experiment_id: str) -> None:
    """Open on the runs table (experiment kind), with the realigned model's harmful score as the primary metric
    (its chart comes first in the chart view); once per experiment."""
    tags = client.get_experiment(experiment_id).tags
    for key, value in ((EXPERIMENT_KIND_TAG, EXPERIMENT_KIND), (PRIMARY_METRIC_TAG, PRIMARY_METRIC)):
        if tags.get(key) != value:
            set_tag(client, experiment_id, key, value)


def publish_view(client, experiment_id: str, variants: Iterable[str], parent_run_id: str | None = None) -> None:
    """Save (or widen) the results view: the union of the variants seen so far, every grid parent expanded."""
    exp = client.get_experiment(experiment_id)
    old = json.loads(exp.tags.get(VIEW_TAG) or "{}")
    known = {c.split("/", 1)[1].rstrip("`") for c in old.get("selectedColumns", []) if c.startswith("metrics.`hs/")}
    expand = set(old.get("runsExpanded", {})) | ({parent_run_id} if parent_run_id else set())
    state = view_state(known | set(variants), expand)
    if state != old:
        set_tag(client, experiment_id, VIEW_TAG, json.dumps(state))
    if not exp.tags.get(NOTE_TAG):
        set_tag(client, experiment_id, NOTE_TAG, experiment_note(experiment_id))


def experiment_note(experiment_id: str) -> str:
    return (f"NLSR cells: one run per cell (grid cells nested under their grid's run). Metrics `hs/<variant>` = "
            f"harmful score (lower is better), `fa/<variant>` = task accuracy. "
            f"[Open the runs table with these columns]({results_view_path(experiment_id)[1:]}); each run's "
            f"description holds its results table.")


def results_view_path(experiment_id: str) -> str:
    """The UI path (after the server address) of the saved results view. `workflowType=machine_learning`: the
    MLflow 3.17 UI has a GenAI / model-training switch, stored per browser and GenAI by default, that overrides
    the experiment kind; the parameter selects model training."""
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
