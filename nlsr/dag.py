"""The DAG of one experiment cell, described once: stages, their inputs, the config they read, the variants.

    poison ─────────────────────────────────────────────┐
    base ─► sft (W0) ─► align ─► reference ─► score ──┐   │
              │           │                          ▼   ▼
              │           ├──► unalign (RESTA) ─► realign:<m> ◄── finetune ◄──┘   (one per post-fine-tuning defense)
              │           └──────────────────────────────────► finetune:<d>     (one per fine-tuning-stage defense)
              └──► align:<a> ────────────────────────────────► finetune:<a>     (one per alignment-stage defense)
    evaluate:<variant> for every adapter above ─► report

Three readers walk this one description, so they cannot drift apart:
- the flow (`flows/cell.run_dag`) calls the Prefect task of each step in order;
- the cache keys (`tasks/keys.plan`) hash each step's config slice (`stage_config`) with its inputs' keys;
- the benchmark (`benchmarks/stages`) runs each step's library body (`run_step`) in a fresh process.

A step's `inputs` map the stage function's parameter names to the label of the step that produces them ('base' is
the raw model, not a stage). Which steps exist follows from the config and the method registries
(`nlsr.methods`): a realigner's registry entry names its inputs, so RESTA's 'unalign' step exists only in cells
that evaluate RESTA. Adding a method therefore never touches this file.

Bump a stage's `version` when its library code changes its output: every artifact of that stage, and everything
downstream, then gets a new key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import ConfigError, ExperimentConfig
from .data import is_prompt_file
from .judges.registry import judge_identity
from .methods import ALIGNMENT, ALIGNMENT_DEFENSES, FINETUNE_DEFENSES, REALIGNERS, stacked_variant

MIX_FILE = "mix.jsonl"
MASKS_FILE = "masks.safetensors"


@dataclass(frozen=True)
class Stage:
    """One kind of step: its code version, the config slice it reads (`reads(cfg, method)`), the file its
    artifact folder holds when its output is one file (None: the folder itself), and what it makes."""
    name: str
    version: int
    reads: Callable[[ExperimentConfig, str | None], dict]
    sections: tuple[str, ...]  # the config sections `reads` draws from (documentation, README table)
    output: str | None = None
    doc: str = ""


@dataclass(frozen=True)
class Step:
    """One stage invocation of a cell."""
    label: str                                   # unique in the cell: 'finetune', 'realign:safelora', ...
    stage: str
    inputs: dict[str, str | None]                # parameter -> producing step label ('base' = raw model) or None
    method: str | None = None
    variant: str | None = None                   # evaluate steps: the variant evaluated
    defense: dict = field(default_factory=dict)  # evaluate steps: {"defense": name, "defense_stage": stage}


def _common(cfg: ExperimentConfig) -> dict:
    return {"dtype": cfg.model.dtype, "template": cfg.data.template, "seed": cfg.seed}


def _poison(cfg, method=None):
    return cfg.data.model_dump(include={"task", "n", "poison_ratio", "poison_source", "seed"})


def _sft(cfg, method=None):
    a = cfg.alignment
    out = {**_common(cfg), "lora": cfg.lora.model_dump(),
           "sft": drop_late_defaults(a.sft.model_dump(), "alignment.sft"), "harmless_mix": a.harmless_mix}
    out.update(drop_late_defaults({"safety_answers": a.safety_answers}, "alignment"))
    if a.harmless_mix > 0:  # harmless rows come from the task: only then does the task matter
        out["task"] = cfg.data.task
    return out


def _align(cfg, method=None):
    a = cfg.alignment
    out = {**_common(cfg), "method": a.method, "lora": cfg.lora.model_dump(),
           "preference": a.preference.model_dump() if not ALIGNMENT.meta(a.method).get("raw_base") else None}
    if out["preference"] is not None:  # the pairs are filtered only where there are pairs
        out.update(drop_late_defaults({"safety_answers": a.safety_answers}, "alignment"))
    if method:  # align:<d>, an alignment-stage defense: its name and its own knobs (defenses.<section>)
        out["defense"] = method
        section = ALIGNMENT_DEFENSES.meta(method).get("section")
        if section:
            out["defense_settings"] = getattr(cfg.defenses, section).model_dump()
    return out


def _reference(cfg, method=None):
    return cfg.reference.model_dump()


def _score(cfg, method=None):
    sc, ev = cfg.scoring, cfg.evaluation
    # calibration_format joined the config later: at its default it stays out, so existing keys hold
    exclude = {"calibration_format"} if sc.calibration_format == "paper" else set()
    if sc.calibration == "safe":  # shipped answers: the generation settings and the judge are not read
        return {"dtype": cfg.model.dtype, "template": cfg.data.template,
                "scoring": sc.model_dump(exclude={"calibration_pool", "calibration_max_new_tokens", *exclude})}
    return {"dtype": cfg.model.dtype, "template": cfg.data.template, "scoring": sc.model_dump(exclude=exclude),
            "judge": {"name": ev.judge, "path": ev.judge_path, "batch_size": ev.batch_size,
                      "identity": judge_identity(ev.judge, ev.judge_path)}}


def _finetune(cfg, method=None):
    ft = cfg.finetune.plain() if method is None else cfg.finetune.settings(method)
    out = {**_common(cfg), "lora": cfg.lora.model_dump(), "finetune": drop_late_defaults(ft, "finetune")}
    meta = FINETUNE_DEFENSES.meta(method) if method else {}
    section = meta.get("section")
    if section:  # the defense's own knobs (defenses.<section>); a knob-less section adds nothing to the key
        settings = getattr(cfg.defenses, section).model_dump()
        if settings:
            out["defense_settings"] = settings
    if meta.get("safety_rows"):  # its guard / guide rows come from the safety-SFT pool that this field filters
        out.update(drop_late_defaults({"safety_answers": cfg.alignment.safety_answers}, "alignment"))
    return out


def _unalign(cfg, method=None):
    return {**_common(cfg), "lora": cfg.lora.model_dump(),
            "unaligned": drop_late_defaults(cfg.realign.unaligned.model_dump(), "realign.unaligned")}


def _realign(cfg, method=None):
    return {"method": method, "realign": cfg.realign.settings(method)}


# Fields that joined the config after results were recorded: at their default they stay out of the keys and of the
# experiment hash (tasks/keys.experiment_hash), so existing artifacts, MLflow runs and report keys stay valid.
LATE_FIELDS = {("alignment", "defenses"): [], ("alignment", "safety_answers"): "all",
               ("evaluation", "task_split"): "test", ("evaluation", "extra_harmful_limit"): None,
               ("realign", "stack_on"): [],
               **{(*train, "padding_free"): False for train in (("alignment", "sft"), ("alignment", "preference"),
                                                                ("finetune",), ("realign", "unaligned"))}}


def drop_late_defaults(dump: dict, section: str | None = None) -> dict:
    """`dump` (the whole config's, or the dotted `section`'s, e.g. 'alignment.sft') without the late fields that
    hold their default."""
    prefix = tuple(section.split(".")) if section else ()
    for path, default in LATE_FIELDS.items():
        if path[:len(prefix)] != prefix:
            continue
        *parents, name = path[len(prefix):]
        part = dump
        for key in parents:
            part = part.get(key, {})
        if part.get(name, default) == default:
            part.pop(name, None)
    return dump


def _evaluate(cfg, method=None):
    # The judge's identity (name + weights hash): new judge weights -> new evaluations.
    out = {**_common(cfg), "task": cfg.data.task,
           "evaluation": drop_late_defaults(cfg.evaluation.model_dump(), "evaluation"),
           "judge_identity": judge_identity(cfg.evaluation.judge, cfg.evaluation.judge_path)}
    if is_prompt_file(cfg.evaluation.harmful_set):  # a user's file: its content, not its name, is the input
        out["harmful_set_sha256"] = hashlib.sha256(Path(cfg.evaluation.harmful_set).read_bytes()).hexdigest()
    return out


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("poison", 1, _poison, ("data",), doc="the poisoned fine-tuning mix"),
    Stage("sft", 1, _sft, ("seed", "model.dtype", "data.template", "lora", "alignment.sft", "alignment.harmless_mix",
                           "alignment.safety_answers"),
          doc="safety SFT merged into the base: W0"),
    Stage("align", 1, _align, ("seed", "model.dtype", "data.template", "lora", "alignment.method",
                               "alignment.preference", "alignment.safety_answers", "defenses"),
          doc="the aligned adapter ΔW_a; align:<a> under an alignment-stage defense"),
    Stage("reference", 1, _reference, ("reference",), doc="the safety reference adapter (pre-amplified)"),
    Stage("score", 1, _score, ("model.dtype", "data.template", "scoring", "evaluation.judge"), output=MASKS_FILE,
          doc="safety-critical neuron masks"),
    Stage("finetune", 1, _finetune, ("seed", "model.dtype", "data.template", "lora", "finetune", "defenses"),
          doc="the (harmfully) fine-tuned adapter ΔW_t; finetune:<d> under a fine-tuning-stage defense"),
    Stage("unalign", 1, _unalign, ("seed", "model.dtype", "data.template", "lora", "realign.unaligned"),
          doc="RESTA's unaligned adapter: ΔW_a continued on harmful-only rows"),
    Stage("realign", 1, _realign, ("realign",), doc="a post-fine-tuning defense applied to ΔW_t"),
    Stage("evaluate", 1, _evaluate, ("seed", "model.dtype", "data.template", "data.task", "evaluation"),
          doc="harmful score and task accuracy of one variant"),
    Stage("report", 3, lambda cfg, method=None: {}, (), doc="the cell's results table and plot"),
)}
STAGE_VERSIONS = {name: s.version for name, s in STAGES.items()}


def stage_config(stage: str, cfg: ExperimentConfig, method: str | None = None) -> dict:
    """The part of the config a stage reads. Device is left out on purpose: an artifact computed on a GPU is reused
    on a CPU and vice versa."""
    if stage not in STAGES or stage == "report":
        raise KeyError(f"unknown stage {stage!r}; expected one of {[s for s in STAGES if s != 'report']}")
    return STAGES[stage].reads(cfg, method)


def variant_name(cfg: ExperimentConfig, method: str) -> str:
    """The evaluated variant a realigner produces: 'realigned' for the main method, else its own name."""
    return "realigned" if method == cfg.realign.method else method


def steps(cfg: ExperimentConfig) -> list[Step]:
    """Every step of one cell, in execution order (inputs before their consumers)."""
    out: list[Step] = []
    # The aligned adapter sits on W0 (the SFT-merged base), except for a raw-base method ('sft').
    labels = {"base": "base", "wbase": "base" if ALIGNMENT.meta(cfg.alignment.method).get("raw_base") else "sft"}

    def add(label, stage, inputs, method=None, **kw):
        out.append(Step(label, stage, {k: labels.get(v, v) if v else None for k, v in inputs.items()}, method,
                        **kw))

    def evaluate(variant, base, adapter, defense, defense_stage):
        add(f"evaluate:{variant}", "evaluate", {"base": base, "adapter": adapter}, variant=variant,
            defense={"defense": defense, "defense_stage": defense_stage})

    add("poison", "poison", {})
    add("sft", "sft", {"base": "base"})
    add("align", "align", {"w0": "sft"})
    add("reference", "reference", {"aligned": "align"})
    add("score", "score", {"base": "wbase", "reference": "reference"})
    aligned = cfg.finetune.aligned
    if aligned:
        add("finetune", "finetune", {"base": "wbase", "adapter": "align", "mix": "poison"})
    else:  # the whole cell is 'Non-Aligned': a fresh LoRA on the raw base, nothing to realign
        add("finetune", "finetune", {"base": "base", "adapter": None, "mix": "poison"})
    evaluate("aligned", "wbase", "align", "none", "alignment")
    evaluate("finetuned", "wbase" if aligned else "base", "finetune", "none", "fine-tuning")
    for d in cfg.finetune.defenses:
        inputs = FINETUNE_DEFENSES.meta(d).get("inputs", {"base": "wbase", "adapter": "align", "mix": "poison"})
        add(f"finetune:{d}", "finetune", inputs, method=d)
        evaluate(d, inputs["base"], f"finetune:{d}", d, "fine-tuning")
    for d in cfg.alignment.defenses:  # its own aligned adapter, then the same (undefended) fine-tuning on it
        add(f"align:{d}", "align", {"w0": "sft"}, method=d)
        add(f"finetune:{d}", "finetune", {"base": "wbase", "adapter": f"align:{d}", "mix": "poison"})
        evaluate(d, "wbase", f"finetune:{d}", d, "alignment")
    if aligned:
        methods = cfg.realign.methods()
        needed = {src for m in methods for src in REALIGNERS.meta(m).get("inputs", {}).values() if src}
        if "unalign" in needed:
            add("unalign", "unalign", {"base": "wbase", "adapter": "align"})
        for m in methods:
            add(f"realign:{m}", "realign", REALIGNERS.meta(m)["inputs"], method=m)
            v = variant_name(cfg, m)
            evaluate(v, "wbase", f"realign:{m}", m, "post-fine-tuning")
        m = cfg.realign.method
        for d in cfg.realign.stack_on:  # the main realigner on a fine-tuning-stage defense's own adapter
            inputs = {k: f"finetune:{d}" if v == "finetune" else v for k, v in REALIGNERS.meta(m)["inputs"].items()}
            v = stacked_variant(d, m)
            add(f"realign:{v}", "realign", inputs, method=m)
            evaluate(v, "wbase", f"realign:{v}", v, "fine-tuning+post-fine-tuning")
    evals = [s for s in out if s.stage == "evaluate"]
    out.append(Step("report", "report", {s.variant: s.label for s in evals}))
    seen = [s.label for s in out]
    if len(set(seen)) != len(seen):  # e.g. one name in two defense families: two steps would share a label
        raise ConfigError(f"the cell has two steps named {sorted({x for x in seen if seen.count(x) > 1})}; "
                         "defense names must differ across alignment.defenses, finetune.defenses and realign")
    return out


def variants(cfg: ExperimentConfig) -> dict[str, dict]:
    """{variant: {"defense": name, "defense_stage": 'alignment' | 'fine-tuning' | 'post-fine-tuning'}}."""
    return {s.variant: s.defense for s in steps(cfg) if s.stage == "evaluate"}


# ---------------------------------------------------------------------------------------------- library bodies

def artifact_path(stage: str, folder: Path) -> Path:
    """Where a consumer finds a step's output inside its artifact folder (a file for one-file stages)."""
    name = {"poison": MIX_FILE, "score": MASKS_FILE}.get(stage)
    return Path(folder) / name if name else Path(folder)


def run_step(step: Step, cfg: ExperimentConfig, paths: dict[str, Path | None], out: Path, judge=None) -> dict:
    """The library body of one step: `paths` are its inputs (already resolved with `artifact_path`), `out` where
    it writes (the file itself for one-file stages, else a folder that does not exist yet). Returns metrics."""
    stage, p = step.stage, paths
    if stage == "poison":
        from .data import poison_mix, write_jsonl
        d = cfg.data
        rows = poison_mix(d.task, d.n, d.poison_ratio, d.seed, d.poison_source)
        write_jsonl(rows, Path(out) / MIX_FILE)
        return {"n_rows": len(rows), "n_unsafe": sum(r["flag"] == "unsafe" for r in rows)}
    if stage == "sft":
        from .training import safety_sft
        return safety_sft(cfg, p["base"], out)
    if stage == "align":
        from .training import preference_align
        fn = preference_align if step.method is None else ALIGNMENT_DEFENSES.get(step.method)
        return fn(cfg, p["w0"], out)
    if stage == "reference":
        from .reference import build_reference
        return build_reference(p["aligned"], out, cfg.reference)
    if stage == "score":
        from .calibration import calibration_rows
        from .scoring import score_neurons
        rows, info = calibration_rows(cfg, p["base"], p["reference"], save_to=Path(out).parent)
        return score_neurons(p["base"], p["reference"], rows, cfg.scoring, out, template=cfg.data.template,
                             device=cfg.model.device, dtype=cfg.model.dtype, extra=info)
    if stage == "finetune":
        from .training import finetune
        fn = finetune if step.method is None else FINETUNE_DEFENSES.get(step.method)
        return fn(cfg, p["base"], p["adapter"], p["mix"], out)
    if stage == "unalign":
        from .resta import train_unaligned
        return train_unaligned(cfg, p["base"], p["adapter"], out)
    if stage == "realign":
        return REALIGNERS.get(step.method)(p, cfg, out, step.method)
    if stage == "evaluate":
        from .evaluation import evaluate
        return evaluate(cfg, p["base"], p["adapter"], out, judge=judge)
    raise KeyError(f"stage {stage!r} has no library body (the report is written by tasks.stages.report)")
