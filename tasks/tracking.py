"""MLflow tracking of cells and grids, through `MlflowClient` with explicit run ids (no fluent, per-thread state).

Layout: one experiment per grid (`nlsr/<grid name>`) or per config name (`nlsr/<name>`); a parent run per grid;
a child run per cell (tag `mlflow.parentRunId`). A rerun of the same cell reattaches to its run (found by the
`nlsr.config_hash` tag), so resuming never duplicates runs or metrics: each stage is logged once per run, and
`nlsr.key.<stage>` remembers which artifact key was logged.

The flow logs every stage's `Ref` after the task returns, whether the stage was computed or a cache hit, so every
cell run holds all of its metrics even when its alignment was trained by another cell.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from nlsr.artifacts import ArtifactStore, Ref, package_versions
from nlsr.config import ExperimentConfig, stable_hash
from nlsr.errors import NLSRError

from .keys import experiment_hash
from .ui_artifacts import NOTE_TAG, cell_title, prepare_experiment, publish_view, split_stage_metrics

# Files of a stage's artifact folder worth a copy in MLflow (small; adapters and models stay in the store).
STAGE_FILES = {"realign": ("realign_report.json",), "evaluate": ("metrics.json", "samples.jsonl"),
               "reference": ("reference_report.json",), "score": ("masks.report.json",),
               "report": ("results.csv", "results.md", "summary.csv", "pareto.png")}
VERSION_PACKAGES = ("nlsr", "torch", "transformers", "peft", "trl", "prefect", "mlflow")


class TrackingError(NLSRError):
    """The tracking server cannot be reached or refused a request."""


# --------------------------------------------------------------------------------------------- where

def tracking_uri(cfg: ExperimentConfig) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI (the compose stack sets it), else SQLite under the artifact
    root (MLflow 3.17 refuses the plain file store by default)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{ArtifactStore(cfg.artifact_root).root / 'mlflow.db'}"


def experiment_name(cfg: ExperimentConfig, grid: str | None = None) -> str:
    return cfg.tracking.experiment or f"nlsr/{grid or cfg.name}"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast: an MLflow client pointed at a dead server retries for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
    except OSError as err:
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({err}); start it "
                            f"(`nlsr ui` prints the command) or unset MLFLOW_TRACKING_URI") from None
    raise TrackingError(f"MLflow tracking server {uri} is not healthy")


def client(uri: str):
    """An MlflowClient. For SQLite, the database folder is created first, and the opening (which creates or
    migrates the schema) holds a file lock: two processes migrating one fresh database at once fail."""
    from mlflow.tracking import MlflowClient
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    from filelock import FileLock
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        try:
            return MlflowClient(uri)
        except Exception as err:  # noqa: BLE001 - sqlalchemy / alembic errors name no file
            first = (str(err).strip().splitlines() or [""])[0]
            raise TrackingError(f"MLflow database {db} cannot be opened ({type(err).__name__}: {first[:200]}); "
                                f"move it aside or set tracking.uri") from None


def git_info(cwd: str | Path | None = None) -> dict[str, str]:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=cwd or Path(__file__).parent, capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(git("status", "--porcelain"))).lower()}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


# --------------------------------------------------------------------------------------------- runs

class Tracker:
    """One MLflow run (a cell or a grid) and the logging the flows need."""

    def __init__(self, uri: str, run_id: str, experiment_id: str):
        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id
        self.client = client(uri)

    # ---- opening

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, match: dict[str, str], tags: dict[str, str],
             artifact_root: Path | None = None) -> "Tracker":
        """Reattach to the run carrying the `match` tags, or create it; mark it RUNNING."""
        check_server(uri)
        mlc = client(uri)
        exp_id = _experiment(mlc, experiment, uri, artifact_root)
        prepare_experiment(mlc, exp_id)
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in match.items())
        found = mlc.search_runs([exp_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            mlc.update_run(run_id, status="RUNNING")
        else:
            run_id = mlc.create_run(exp_id, run_name=run_name, tags={**match, **tags}).info.run_id
        tracker = cls(uri, run_id, exp_id)
        tracker.set_tags(tags)
        return tracker

    @classmethod
    def for_cell(cls, cfg: ExperimentConfig, grid: str | None = None, parent_run_id: str | None = None,
                 flow_run_id: str | None = None, run_name: str | None = None) -> "Tracker":
        match = {"nlsr.config_hash": experiment_hash(cfg), "nlsr.kind": "cell"}
        if parent_run_id:
            match["mlflow.parentRunId"] = parent_run_id
        tags = {**_common_tags(flow_run_id), "nlsr.grid": grid or "", "nlsr.task": cfg.data.task,
                "nlsr.alignment": cfg.alignment.method, "nlsr.scorer": cfg.scoring.method,
                "nlsr.poison_ratio": str(cfg.data.poison_ratio), "nlsr.seed": str(cfg.seed),
                "nlsr.data_seed": str(cfg.data.seed),
                "nlsr.artifact_root": str(ArtifactStore(cfg.artifact_root).root)}
        uri = tracking_uri(cfg)
        tracker = cls.open(uri, experiment_name(cfg, grid), run_name or cell_title(cfg), match, tags,
                           ArtifactStore(cfg.artifact_root).root)
        tracker.log_params(flatten(cfg.model_dump(mode="json")))
        tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
        return tracker

    @classmethod
    def for_grid(cls, name: str, spec: dict, first: ExperimentConfig, flow_run_id: str | None = None) -> "Tracker":
        match = {"nlsr.grid_hash": stable_hash(spec), "nlsr.kind": "grid"}
        tags = {**_common_tags(flow_run_id), "nlsr.grid": name}
        tracker = cls.open(tracking_uri(first), experiment_name(first, name), f"grid {name}", match, tags,
                           ArtifactStore(first.artifact_root).root)
        tracker.log_params(flatten({"grid": spec}))
        return tracker

    # ---- logging

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._metrics([(k, v, step) for k, v in metrics.items()])

    def _metrics(self, triples: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(_metric_name(k), float(v), now, int(s)) for k, v, s in triples]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_stage(self, label: str, ref: Ref) -> bool:
        """Metrics (numbers, per-step losses, wall time) and small files of one stage, once per run and key."""
        tag = f"nlsr.key.{label.replace(':', '.')}"  # also what `nlsr report` reads (one tag per stage, not two)
        if self.client.get_run(self.run_id).data.tags.get(tag) == ref.key:
            return False
        prefix = _prefix(label)
        # per-factor / per-category statistics and evaluation details: a JSON file, not hundreds of metrics
        scalars, stats = split_stage_metrics(ref.metrics, ref.stage)
        triples = [(f"{prefix}/{k}", v, 0) for k, v in scalars.items()]
        triples += [(f"{prefix}/step_loss", loss, step) for step, loss in _losses(ref.metrics)]
        self._metrics(triples)
        if stats:
            self.log_dict(stats, f"{prefix}/stats.json")
        for name in STAGE_FILES.get(ref.stage, ()):
            if ref.file(name).is_file():
                self.log_file(ref.file(name), prefix)
        self.set_tags({tag: ref.key})
        return True

    def log_dict(self, obj: Any, name: str) -> None:
        """obj as JSON at artifact path `name` (folders allowed: 'score/stats.json')."""
        folder, _, base = name.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / base
            path.write_text(json.dumps(obj, indent=2, default=str))
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def describe(self, markdown: str) -> None:
        """The run's description in the UI (Markdown)."""
        self.set_tags({NOTE_TAG: markdown})

    def publish_view(self, variants, parent_run_id: str | None = None) -> None:
        """The experiment's saved results view covers these variants (and shows this grid's cells expanded)."""
        publish_view(self.client, self.experiment_id, variants, parent_run_id)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def url(self) -> str | None:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return None


def _experiment(client, name: str, uri: str, artifact_root: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # Local stores keep artifacts beside the database (MLflow's default is ./mlruns in the current folder);
    # a server chooses its own (proxied) artifact store.
    location = None
    if artifact_root is not None and not uri.startswith(("http://", "https://")):
        location = (Path(artifact_root) / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _common_tags(flow_run_id: str | None) -> dict[str, str]:
    tags = {**git_info(), **{f"version.{k}": v for k, v in package_versions(VERSION_PACKAGES).items()}}
    if flow_run_id:
        tags["prefect.flow_run_id"] = str(flow_run_id)
    deployment_id = _deployment_id()
    if deployment_id:
        tags["prefect.deployment_id"] = deployment_id
    return tags


def _deployment_id() -> str | None:
    """The deployment of the current flow run, from the run context (prefect.runtime.deployment may call the
    API, which costs seconds)."""
    try:
        from prefect.context import FlowRunContext
        ctx = FlowRunContext.get()
        return str(ctx.flow_run.deployment_id) if ctx and ctx.flow_run and ctx.flow_run.deployment_id else None
    except Exception:  # noqa: BLE001 - outside a Prefect run
        return None


def _prefix(label: str) -> str:
    """'evaluate:aligned' -> 'aligned' (the variant is what users compare); 'realign:nlsr' -> 'realign/nlsr'."""
    stage, _, rest = label.partition(":")
    return rest if stage == "evaluate" else label.replace(":", "/")


def _losses(metrics: dict) -> list[tuple[int, float]]:
    out = []
    for i, item in enumerate(metrics.get("losses") or []):
        if isinstance(item, dict) and "loss" in item:
            out.append((int(item.get("step", i)), float(item["loss"])))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append((int(item[0]), float(item[1])))
    return out


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text[:6000]
