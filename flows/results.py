"""Result rows for `nlsr report`: from the artifact store (every finished cell) or from one MLflow experiment."""
from __future__ import annotations

import json
from pathlib import Path

from nlsr import report
from nlsr.artifacts import ArtifactStore
from nlsr.errors import NLSRError

METRICS = ("harmful_score", "task_accuracy")
COUNTS = ("n_harmful", "n_task")  # logged with the scores: enough for a Wilson interval without the verdicts


def store_rows(root: str | Path) -> list[dict]:
    """Rows of every finished cell report under the artifact root."""
    store = ArtifactStore(root)
    return latest_cells([judged(json.loads((store.path("report", key) / "rows.json").read_text()), store)
                         for key in store.keys("report")])  # oldest first


def judged(rows: list[dict], store: ArtifactStore) -> list[dict]:
    """Rows with their per-prompt verdicts, intervals and defense costs (`with_costs`). A report written before rows carried verdicts gets them
    from its evaluation artifacts (samples.jsonl, still in the store), so old cells get intervals and paired
    tests without re-running anything."""
    from nlsr.data import read_jsonl
    from nlsr.evaluation import verdicts
    out = []
    for r in rows:
        key = r.get("eval_key")
        if not r.get("verdicts") and key and store.done("evaluate", key):
            harmful_set = store.meta("evaluate", key)["config"]["evaluation"]["harmful_set"]
            r = {**r, "verdicts": verdicts(read_jsonl(store.path("evaluate", key) / "samples.jsonl"), harmful_set)}
        out.append(report.with_intervals(r))
    return with_costs(out, store)


def _find(store: ArtifactStore, key: str) -> str | None:
    """The stage holding a finished artifact `key` (keys are content hashes, unique across stages)."""
    from nlsr.dag import STAGES
    return next((stage for stage in STAGES if store.done(stage, key)), None)


def _ancestors(store: ArtifactStore, stage: str, key: str, seen: dict[tuple[str, str], float]) -> None:
    """(stage, key) -> wall seconds of every artifact `key` was computed from, itself included (the time it took
    when it was computed, recorded in its _SUCCESS; a cache hit costs nothing but keeps its recorded time)."""
    if (stage, key) in seen:
        return
    meta = store.meta(stage, key)
    seen[(stage, key)] = float((meta.get("timings") or {}).get("wall_s") or 0.0)
    for parent in (meta.get("inputs") or {}).values():
        parent_stage = _find(store, parent) if isinstance(parent, str) else None
        if parent_stage:
            _ancestors(store, parent_stage, parent, seen)


def with_costs(rows: list[dict], store: ArtifactStore) -> list[dict]:
    """Adds `defense_s` to the defended rows of one cell: the compute time of the steps a variant needs beyond the
    undefended pipeline (the steps behind its evaluated adapter that the fine-tuned model's evaluation does not
    need: NLSR's reference, scoring and realignment; a fine-tuning-stage defense's own fine-tuning; RESTA's
    un-alignment...). Evaluation itself is not counted. Rows whose artifacts are gone are left as they are."""
    def steps(row: dict) -> dict[tuple[str, str], float] | None:
        key = row.get("eval_key")
        if not key or not store.done("evaluate", key):
            return None
        seen: dict[tuple[str, str], float] = {}
        _ancestors(store, "evaluate", key, seen)
        del seen[("evaluate", key)]
        return seen
    by_variant = {r["variant"]: r for r in rows}
    undefended = steps(by_variant["finetuned"]) if "finetuned" in by_variant else None
    if undefended is None:
        return rows
    out = []
    for r in rows:
        own = steps(r) if r["variant"] not in ("aligned", "finetuned") else None
        if own is not None:
            r = {**r, "defense_s": round(sum(s for k, s in own.items() if k not in undefended), 1)}
        out.append(r)
    return out


def mlflow_rows(root: str | Path, experiment: str, uri: str | None = None) -> list[dict]:
    """Rows of the cell runs of one MLflow experiment: read from the store when the run's report artifact is
    there (tag nlsr.key.report), else rebuilt from the run's metrics and tags."""
    from tasks.tracking import check_server
    from tasks.tracking import client as mlflow_client
    uri = uri or _default_uri(root)
    check_server(uri)
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise NLSRError(f"no MLflow experiment {experiment!r} at {uri}; experiments: {names}")
    store, cells, grid_axes = ArtifactStore(root), [], _grid_axes(client, exp.experiment_id)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`nlsr.kind` = 'cell'", max_results=10000)
    runs = sorted(runs, key=lambda r: r.info.end_time or r.info.start_time or 0)  # last finished last: latest_cells
    ids = []
    for run in runs:
        tags, key = run.data.tags, run.data.tags.get("nlsr.key.report")
        if run.info.status != "FINISHED":
            continue
        if key and store.done("report", key):
            rows = judged(json.loads((store.path("report", key) / "rows.json").read_text()), store)
        else:
            rows = [report.with_intervals(r) for r in _rows_from_metrics(run.data.metrics, tags, run.data.params)]
        parent = tags.get("mlflow.parentRunId")
        axes = report.extra_axes(grid_axes.get(parent, []))
        cells.append([{**r, **{a: _value(run.data.params.get(a)) for a in axes}} for r in rows])
        # A grid cell is its grid run and its label: after an upgrade changed the config hash (or the keys), the
        # re-run cell is a new MLflow run under the same parent and label, and replaces the old one.
        ids.append((parent, run.info.run_name) if parent else None)
    return latest_cells(cells, ids)


def _grid_axes(client, experiment_id: str) -> dict[str, list[str]]:
    """Grid parent run id -> its axes (logged as params grid.axes.<dotted key>), so that a sweep's cells keep
    their axis values apart in the summary (as the grid flow's own table does)."""
    runs = client.search_runs([experiment_id], filter_string="tags.`nlsr.kind` = 'grid'", max_results=1000)
    prefix = "grid.axes."
    return {r.info.run_id: [k[len(prefix):] for k in r.data.params if k.startswith(prefix)] for r in runs}


def _value(param: str | None):
    """A config value back from its MLflow param text (numbers as numbers)."""
    import yaml
    try:
        return yaml.safe_load(param) if param is not None else None
    except yaml.YAMLError:
        return param


def _rows_from_metrics(metrics: dict, tags: dict, params: dict) -> list[dict]:
    variants = sorted({k.split("/")[0] for k in metrics if k.endswith(tuple(f"/{m}" for m in METRICS))})
    base = {"name": params.get("name"), "task": tags.get("nlsr.task"), "alignment": tags.get("nlsr.alignment"),
            "scorer": tags.get("nlsr.scorer"), "realign": params.get("realign.method"),
            "poison_ratio": _float(tags.get("nlsr.poison_ratio")), "seed": _int(tags.get("nlsr.seed")),
            "data_seed": _int(tags.get("nlsr.data_seed")),
            "config_hash": tags.get("nlsr.config_hash", "")[:12]}
    return [{**base, "variant": v, **{m: metrics.get(f"{v}/{m}") for m in (*METRICS, *COUNTS)}} for v in variants]


def _float(x):
    return None if x in (None, "") else float(x)


def _int(x):
    return None if x in (None, "") else int(x)


def _default_uri(root: str | Path) -> str:
    import os
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ArtifactStore(root).root / 'mlflow.db'}"


def latest_cells(cells: list[list[dict]], ids: list | None = None) -> list[dict]:
    """The rows of each cell once; the last one wins. A cell is `ids[i]` where given (a grid cell: its grid run and
    label), else its evaluations (variant -> evaluation artifact): the same evaluations reported twice (by two
    grids, or after a report-format change) are one cell. Cells rebuilt from MLflow metrics (no evaluation keys)
    are all kept."""
    latest: dict[tuple, list[dict]] = {}
    for i, rows in enumerate(cells):
        measured = tuple(sorted((r.get("variant"), r.get("eval_key")) for r in rows))
        given = ids[i] if ids else None
        key = ("id", given) if given else measured if rows and all(r.get("eval_key") for r in rows) else (i,)
        latest[key] = rows
    return [row for rows in latest.values() for row in rows]


def file_rows(paths: list[str | Path]) -> list[dict]:
    """Rows of rows.jsonl files (nlsr.report.write_results), e.g. parts of one grid run on machines that share no
    store. A cell (its config hash) found in several files is taken from the last one; its intervals are computed
    again from its verdicts."""
    from nlsr.data import jsonl_objects
    cells: dict[tuple, list[dict]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise NLSRError(f"--rows {path}: no such file; expected a rows.jsonl written by `nlsr grid` or "
                            f"`nlsr report`")
        found: dict[tuple, list[dict]] = {}
        for line, row in jsonl_objects(path, NLSRError, "a result row (a JSON object)"):
            if not isinstance(row.get("variant"), str) or "harmful_score" not in row:
                raise NLSRError(f"{path}, line {line}: expected a result row with 'variant' and 'harmful_score'")
            cell = (row.get("name"), row.get("config_hash")) if row.get("config_hash") else (str(path), line)
            found.setdefault(cell, []).append(report.with_intervals(row))
        if not found:
            raise NLSRError(f"--rows {path}: holds no rows")
        cells.update(found)
    return [row for rows in cells.values() for row in rows]


def disagreements(rows: list[dict]) -> list[str]:
    """Evaluations (eval_key) whose rows carry different verdicts: parts of a grid whose shared stages (SFT, the
    aligned model...) came out differently, e.g. on other hardware; their merged table mixes two models."""
    seen: dict[str, dict] = {}
    out = []
    for r in rows:
        key, v = r.get("eval_key"), r.get("verdicts")
        if key and v:
            first = seen.setdefault(key, v)
            if first != v and key not in out:
                out.append(key)
    return out


def collect_rows(root: str | Path, experiment: str | None = None, uri: str | None = None) -> list[dict]:
    return mlflow_rows(root, experiment, uri) if experiment else store_rows(root)
