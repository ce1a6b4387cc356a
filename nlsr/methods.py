"""The method families of the pipeline and their built-in members: one registry entry per method.

Config choices (`nlsr.config`), CLI `choices` (`flows/`), the DAG (`nlsr.dag`) and the stage code all read these
registries, so adding a method is one module (its implementation) plus one entry here (or the
`@REGISTRY.register(...)` decorator in the module itself, for plugins: see `nlsr.registry`). Targets are
'module:function' strings, imported on first use: validating a config never imports torch.

Metadata each family reads:
- ALIGNMENT: `raw_base` (the aligned adapter sits on the raw base, not W0: method 'sft').
  Target: `builder(model, tokenizer, cfg, workdir) -> trl trainer` (a fresh LoRA on W0).
- ALIGNMENT_DEFENSES: `section` (its part of the `defenses:` config section, in its own keys only) and `methods`
  (the alignment methods it can change; config validation checks `alignment.method` against them). Each defense d
  gets its own steps align:d (from W0, like `align`), finetune:d (the undefended fine-tuning, continuing align:d's
  adapter) and evaluate:d. Target: `fn(cfg, w0, out) -> metrics` (writes the aligned adapter to `out`).
- FINETUNE_DEFENSES: `inputs` (finetune parameter → DAG step label, see `nlsr.dag`; 'base' is the raw model,
  'wbase' the base the aligned adapter sits on), `settings` (FinetuneConfig fields the defense reads; they
  are left out of the plain fine-tuning key) and `section` (its part of the `defenses:` config section, in its key). Target: `fn(cfg, base, adapter, mix_file, out) -> metrics`.
- SCORERS: `calibration` (whether the scorer reads calibration samples).
  Target: `fn(peft_model, samples, cfg: ScoringConfig, device) -> ({weight key: score}, granularity)`.
- REALIGNERS: `inputs` (realigner input → DAG step label, or None: passed as None and kept in the key) and
  `settings` (RealignConfig fields it reads: its artifact key holds only these), `runs_model` (needs the base
  model itself, not only its shapes: `nlsr realign` then requires --base).
  Target: `fn(paths: {input: Path | None}, cfg: ExperimentConfig, out: Path, method: str) -> report dict`.
"""
from __future__ import annotations

from .registry import Registry

ALIGNMENT = Registry("alignment method", "alignment.method")
ALIGNMENT_DEFENSES = Registry("alignment-stage defense", "alignment.defenses")
FINETUNE_DEFENSES = Registry("fine-tuning-stage defense", "finetune.defenses")
SCORERS = Registry("neuron scorer", "scoring.method")
REALIGNERS = Registry("post-fine-tuning realigner", "realign.method / realign.baselines")

FAMILIES = {"alignment": ALIGNMENT, "alignment-defense": ALIGNMENT_DEFENSES, "finetune": FINETUNE_DEFENSES,
            "scoring": SCORERS, "realign": REALIGNERS}

# ---- alignment (the aligned adapter ΔW_a)
ALIGNMENT.add("dpo", "nlsr.training:dpo_trainer")
ALIGNMENT.add("orpo", "nlsr.training:orpo_trainer")
ALIGNMENT.add("kto", "nlsr.training:kto_trainer")
ALIGNMENT.add("simpo", "nlsr.training:simpo_trainer")
ALIGNMENT.add("sft", None, raw_base=True)  # Table 2's SFT row: the SFT LoRA itself, on the raw base

# ---- alignment-stage defenses (each produces its own aligned adapter, which the undefended fine-tuning continues)
ALIGNMENT_DEFENSES.add("vaccine", "nlsr.defenses.vaccine:align", section="vaccine", methods=("dpo",))  # spec §3

# ---- fine-tuning-stage defenses (each produces its own fine-tuned adapter, a variant of the cell)
FINETUNE_DEFENSES.add("non-aligned", "nlsr.defenses.non_aligned:finetune",  # spec §1: ATTACK, fresh LoRA on M_raw
                      inputs={"base": "base", "adapter": None, "mix": "poison"}, settings=(), section="non_aligned")
# safety_rows: the knob of defenses.<section> that takes rows of the safety-SFT pool (checked against its size)
FINETUNE_DEFENSES.add("vlguard", "nlsr.defenses.vlguard:finetune", settings=(), section="vlguard",
                      safety_rows="guard_fraction")
FINETUNE_DEFENSES.add("lisa", "nlsr.defenses.lisa:finetune", settings=(), section="lisa",
                      safety_rows="guide_fraction")
FINETUNE_DEFENSES.add("constrained-sft", "nlsr.defenses.constrained_sft:finetune", settings=(),
                      section="constrained_sft")

# ---- neuron scorers (safety-critical neuron masks)
SCORERS.add("lowrank", "nlsr.scoring:lowrank_scores", calibration=True)
SCORERS.add("wanda", "nlsr.scoring:wanda_entry", calibration=True)
SCORERS.add("snip", "nlsr.scoring:snip_entry", calibration=True)
SCORERS.add("random", "nlsr.scoring:random_entry", calibration=False)

# ---- post-fine-tuning realigners (each a variant of the one fine-tuned adapter)
_SELECTION = ("layer_rate", "epsilon", "seed", "direction")
_CLASSIC = {"base": "wbase", "reference": "reference", "finetuned": "finetune"}
REALIGNERS.add("nlsr", "nlsr.realign:run_method", inputs={**_CLASSIC, "masks": "score"}, settings=_SELECTION)
REALIGNERS.add("safelora", "nlsr.realign:run_method", inputs={**_CLASSIC, "masks": None}, settings=("safelora_tau",))
REALIGNERS.add("restore-modules", "nlsr.realign:run_method", inputs={**_CLASSIC, "masks": None},
               settings=_SELECTION)
REALIGNERS.add("antidote", "nlsr.antidote:run", inputs={"base": "wbase", "finetuned": "finetune"},
               settings=("antidote",), runs_model=True)
REALIGNERS.add("resta", "nlsr.resta:run",
               inputs={"base": "wbase", "aligned": "align", "finetuned": "finetune", "unaligned": "unalign"},
               settings=("resta",))
REALIGNERS.add("resta-base", "nlsr.resta:run",  # θ_u := W0 (δ = ΔW_a): not the paper's method, labelled apart
               inputs={"base": "wbase", "aligned": "align", "finetuned": "finetune"}, settings=("resta",))


# ---- stacking: the main realigner on a fine-tuning-stage defense's own adapter (realign.stack_on)
STACK_SEP = "-on-"  # MLflow names allow letters, digits, _ - . space : / only: "nlsr-on-lisa", not "lisa+nlsr"


def stacked_variant(defense: str, method: str) -> str:
    """The variant (and step suffix) of `method` applied on top of `defense`: 'nlsr-on-lisa'."""
    return f"{method}{STACK_SEP}{defense}"


def stacked_defense(variant: str) -> str | None:
    """The defense a stacked variant sits on ('nlsr-on-lisa' -> 'lisa'), None for any other variant."""
    method, sep, defense = variant.partition(STACK_SEP)
    return defense if sep and method and defense else None
