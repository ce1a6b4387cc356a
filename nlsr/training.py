"""Training stages with trl + peft: safety SFT (merged into W0), preference alignment, harmful fine-tuning.

Paper names: W0 = the raw base with the safety-SFT LoRA merged in; the *aligned adapter* ΔW_a = a fresh LoRA
trained with DPO / ORPO / KTO / SimPO on top of W0; the *fine-tuned adapter* ΔW_t = the aligned adapter trained
further on the user's (poisoned) data, so that ΔW_t and ΔW_a share one LoRA basis (the transplant needs it).

Every stage returns a small JSON-able dict: wall time, the per-step losses as [step, loss] pairs (for MLflow),
and the final trainer metrics. Losses are computed on response tokens only (trl's prompt-completion format).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data, modeling, packing
from .atomic import atomic_dir
from .config import ExperimentConfig, SupervisedConfig, TrainConfig
from .errors import NLSRError
from .integrity import check_finite
from .methods import ALIGNMENT

SFT_ADAPTER = "sft_adapter"   # inside the W0 folder: the safety-SFT LoRA before merging
W0_INFO = "nlsr_w0.json"      # inside the W0 folder: which raw base it was merged from


class TrainingError(NLSRError):
    """A training stage cannot run with the given inputs; the message names the field or file."""


@dataclass(frozen=True)
class TrainerPlug:
    """How a training-stage defense changes a stage (nlsr/defenses): its trl trainer subclass, extra constructor
    arguments, and trl config fields that override the stage's. The trainer may define `defense_summary()`, a
    JSON-able dict that the stage returns under "defense_summary"."""
    trainer_cls: type | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- trainer plumbing

def _common_args(tc: TrainConfig, cfg: ExperimentConfig, workdir: str) -> dict:
    """TrainingArguments shared by every trl config (fp32 on CPU, no checkpoints, no reporting)."""
    device = modeling.resolve_device(cfg.model.device)
    return dict(
        output_dir=workdir, learning_rate=tc.learning_rate, num_train_epochs=tc.epochs, max_steps=tc.max_steps,
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
        max_length=tc.max_length, lr_scheduler_type=tc.lr_scheduler,
        # transformers 5: a float warmup_steps in [0, 1) is a ratio of the total steps
        warmup_steps=min(tc.warmup_ratio, 0.999), logging_steps=tc.logging_steps, logging_first_step=True,
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", save_strategy="no",
        # trl defaults to gradient checkpointing and bf16: both cost time on CPU and bf16 is not accelerated there
        activation_checkpointing=tc.gradient_checkpointing,
        bf16=cfg.model.dtype == "bfloat16", fp16=cfg.model.dtype == "float16",
        use_cpu=device.type == "cpu", dataloader_num_workers=0,
    )


def _fresh_lora(model, cfg: ExperimentConfig):
    """The peft config of a fresh adapter. The trainer wraps the model itself: handing DPO/KTO an already-wrapped
    model would make them copy the adapter as a 'ref' adapter, which then gets saved with it."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.lora.target_modules if t not in present]
    if missing:
        raise TrainingError(f"lora.target_modules {missing} do not exist in the model")
    return modeling.peft_lora_config(cfg.lora)


def _dataset(rows: list[dict], what: str):
    from datasets import Dataset
    if not rows:
        raise TrainingError(f"{what}: the training set is empty")
    return Dataset.from_list(rows)


def _check_room(tok, prompts: list[str], tc: TrainConfig, what: str) -> None:
    """Fail when no prompt leaves room for a response within max_length: trl would silently train on nothing
    (SFT drops such rows, the preference trainers keep empty completions)."""
    if prompts and all(len(tok(p)["input_ids"]) >= tc.max_length for p in prompts):
        raise TrainingError(f"{what}: every prompt fills max_length={tc.max_length} tokens, so no response token "
                            "is left to train on; raise max_length")


def _sft_trainer(model, tok, rows: list[dict], tc: SupervisedConfig, cfg: ExperimentConfig, workdir: str,
                 peft_config=None, plug: TrainerPlug | None = None):
    """SFTTrainer on {prompt, completion} rows: EOS appended, labels -100 on the prompt (completion_only_loss).
    `plug` swaps in a defense's SFTTrainer subclass. With `tc.padding_free` (and no defense trainer: those read the
    padding mask) a batch is one sequence of its rows: trl's collator gives each row positions from 0, from which
    transformers builds a block-diagonal causal mask, so every token sees what it sees in the padded batch."""
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    plug = plug or TrainerPlug()
    _check_room(tok, [r["prompt"] for r in rows], tc, "SFT")
    args = SFTConfig(**{**_common_args(tc, cfg, workdir), **plug.args}, completion_only_loss=True,
                     dataset_num_proc=None)
    # The collator is handed over rather than set through SFTConfig.padding_free: trl then stops truncating rows
    # to max_length, which this stage relies on.
    collator = (DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
                if padding_free(tc, plug) else None)
    return (plug.trainer_cls or SFTTrainer)(model=model, args=args, train_dataset=_dataset(rows, "SFT"),
                                            processing_class=tok, peft_config=peft_config, data_collator=collator,
                                            **plug.kwargs)


def padding_free(tc: TrainConfig, plug: TrainerPlug | None = None) -> bool:
    """Whether a stage trains padding-free: asked for, and no defense's trainer (which pads)."""
    return tc.padding_free and (plug is None or plug.trainer_cls is None)


def _preference_rows(method: str, tok, cfg: ExperimentConfig):
    pc = cfg.alignment.preference
    rows = data.preference_set(pc.n_samples, cfg.data.template, tok, cfg.alignment.answer_filter())
    _check_room(tok, [r["prompt"] for r in rows], pc, method)
    return _dataset(rows, f"{method} preference")


def _no_trainer_swap(method: str, plug: TrainerPlug | None) -> TrainerPlug:
    """The plug, checked: only DPO takes a defense's trainer subclass (Vaccine); its `args` apply to every method."""
    plug = plug or TrainerPlug()
    if plug.trainer_cls is not None and method != "dpo":
        raise TrainingError(f"alignment.method {method!r} cannot take a defense's trainer; only 'dpo' can")
    return plug


# The alignment builders (nlsr.methods.ALIGNMENT): the trl trainer of one method, with a fresh LoRA on `model` (W0).
# `plug` swaps in a defense's subclass of the method's trainer (Vaccine: of DPOTrainer) and adds trainer args.

def kto_trainer(model, tok, cfg: ExperimentConfig, workdir: str, plug: TrainerPlug | None = None):
    from trl import KTOConfig, KTOTrainer
    plug = _no_trainer_swap("kto", plug)
    pc = cfg.alignment.preference
    rows = data.kto_set(pc.n_samples, cfg.data.template, tok, cfg.alignment.answer_filter())
    _check_room(tok, [r["prompt"] for r in rows], pc, "KTO")
    args = KTOConfig(**{**_common_args(pc, cfg, workdir), **plug.args}, beta=pc.beta)
    # reference = the adapter-disabled model (W0): exactly the paper's reference policy
    return KTOTrainer(model=model, args=args, train_dataset=_dataset(rows, "KTO"), processing_class=tok,
                      peft_config=_fresh_lora(model, cfg))


def dpo_trainer(model, tok, cfg: ExperimentConfig, workdir: str, plug: TrainerPlug | None = None):
    from trl import DPOConfig, DPOTrainer
    plug = _no_trainer_swap("dpo", plug)
    pc = cfg.alignment.preference
    peft_config = _fresh_lora(model, cfg)
    # Reference log-probs are computed on the fly with the adapter disabled: precomputing them costs the same
    # forward passes over the whole set, more than the steps we train when max_steps < one epoch.
    args = DPOConfig(**{**_common_args(pc, cfg, workdir), **plug.args}, beta=pc.beta, loss_type=["sigmoid"])
    return (plug.trainer_cls or DPOTrainer)(model=model, args=args, train_dataset=_preference_rows("dpo", tok, cfg),
                                            processing_class=tok, peft_config=peft_config, **plug.kwargs)


def orpo_trainer(model, tok, cfg: ExperimentConfig, workdir: str, plug: TrainerPlug | None = None):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    plug = _no_trainer_swap("orpo", plug)
    pc = cfg.alignment.preference
    peft_config = _fresh_lora(model, cfg)
    args = ORPOConfig(**{**_common_args(pc, cfg, workdir), **plug.args}, beta=pc.beta,  # beta is ORPO's lambda
                      remove_unused_columns=False)
    return ORPOTrainer(model=model, args=args, train_dataset=_preference_rows("orpo", tok, cfg), processing_class=tok,
                       peft_config=peft_config)


def simpo_trainer(model, tok, cfg: ExperimentConfig, workdir: str, plug: TrainerPlug | None = None):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    plug = _no_trainer_swap("simpo", plug)
    pc = cfg.alignment.preference
    peft_config = _fresh_lora(model, cfg)
    # SimPO = CPO's simpo loss without the NLL term (cpo_alpha 0): reference-free, length-normalised
    args = CPOConfig(**{**_common_args(pc, cfg, workdir), **plug.args}, beta=pc.beta, loss_type="simpo",
                     cpo_alpha=0.0, simpo_gamma=pc.simpo_gamma, remove_unused_columns=False)
    return CPOTrainer(model=model, args=args, train_dataset=_preference_rows("simpo", tok, cfg), processing_class=tok,
                      peft_config=peft_config)


def _preference_trainer(method: str, model, tok, cfg: ExperimentConfig, workdir: str,
                        plug: TrainerPlug | None = None):
    """The trl trainer of one preference method (its ALIGNMENT builder), with a fresh LoRA on `model` (W0). `plug`
    swaps in a defense's subclass of that method's trainer (Vaccine: of DPOTrainer)."""
    return ALIGNMENT.get(method)(model, tok, cfg, workdir, plug)


def _numbers(entry: dict) -> dict:
    return {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _run(trainer, n_rows: int, tc: TrainConfig, what: str, pack: bool = False) -> dict:
    """Train; return the loss curve as [step, loss] pairs and the last logged metrics. Packed sequences (the
    padding-free SFT collator's, or with `pack` the padded batches packed as they enter the decoder) are attended
    row by row (nlsr.packing)."""
    if len(trainer.train_dataset) == 0:
        # trl drops rows whose response is truncated away entirely: say why instead of a sampler error
        raise TrainingError(f"{what}: all {n_rows} training rows were dropped, their prompts fill "
                            f"max_length={tc.max_length} tokens; raise max_length")
    with packing.varlen_attention(trainer.model), \
            (packing.packed_batches(trainer.model) if pack else contextlib.nullcontext()):
        out = trainer.train()
    logs = trainer.state.log_history
    losses = [[int(e["step"]), float(e["loss"])] for e in logs if "loss" in e and "step" in e]
    last = next((e for e in reversed(logs) if "loss" in e), {})
    result = {"losses": losses, "train_loss": float(out.training_loss), "steps": int(trainer.state.global_step),
              "final": _numbers(last)}
    if hasattr(trainer, "defense_summary"):
        result["defense_summary"] = trainer.defense_summary()
    return result


def _load(folder: Path, cfg: ExperimentConfig):
    modeling.num_threads_hint()
    return modeling.load_model(folder, cfg.model.dtype, cfg.model.device), modeling.load_tokenizer(folder)


# ---------------------------------------------------------------------------------------------- stages

def safety_sft(cfg: ExperimentConfig, base: Path, out: Path) -> dict:
    """LoRA SFT on safe answers (+ harmless task rows), merged into `base`: `out` becomes W0.

    `out/sft_adapter` keeps the unmerged SFT LoRA (the 'sft' alignment method uses it on the raw base), and
    `out/nlsr_w0.json` names the raw base.
    """
    t0 = time.time()
    tc = cfg.alignment.sft
    model, tok = _load(base, cfg)
    pc_rows = sft_rows(cfg, tok)
    modeling.set_seed(cfg.seed)  # the LoRA init draws random numbers
    with tempfile.TemporaryDirectory(prefix="nlsr-sft-") as work:
        trainer = _sft_trainer(model, tok, pc_rows, tc, cfg, work, peft_config=_fresh_lora(model, cfg))
        result = _run(trainer, len(pc_rows), tc, "safety SFT")
    result["padding_free"] = padding_free(tc)
    peft_model = trainer.model
    with atomic_dir(out, overwrite=True) as tmp:
        modeling.save_adapter(peft_model, tmp / SFT_ADAPTER, extra={"stage": "safety_sft", "base": str(base)})
        # merge in memory (the adapter is saved above): same result as modeling.merge_to_folder, one load less
        merged = peft_model.merge_and_unload()
        check_finite(dict(merged.named_parameters()), f"merged W0 for {out}")
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / W0_INFO).write_text(json.dumps({"raw_base": str(base), "n_rows": len(pc_rows)}, indent=2))
    return {**result, "n_rows": len(pc_rows), "wall_s": round(time.time() - t0, 2)}


def sft_rows(cfg: ExperimentConfig, tok) -> list[dict]:
    """The safety SFT's rows as {prompt, completion}: safe answers plus the harmless task mix."""
    a = cfg.alignment
    rows = data.safety_sft_set(a.sft.n_samples, a.harmless_mix, cfg.data.task, cfg.seed, a.answer_filter())
    return data.as_prompt_completion(rows, cfg.data.template, tok)


def raw_base_of(w0: Path) -> Path:
    """The raw base a W0 folder was merged from (recorded by safety_sft)."""
    info = Path(w0) / W0_INFO
    if not info.is_file():
        raise TrainingError(f"{w0} is not a W0 folder written by safety_sft (no {W0_INFO})")
    return Path(json.loads(info.read_text())["raw_base"])


def aligned_base(cfg: ExperimentConfig, w0: Path) -> Path:
    """The base the aligned adapter applies to: W0, except for method 'sft' (the SFT LoRA on the raw base)."""
    return raw_base_of(w0) if ALIGNMENT.meta(cfg.alignment.method).get("raw_base") else Path(w0)


def preference_align(cfg: ExperimentConfig, w0: Path, out: Path, plug: TrainerPlug | None = None,
                     extra: dict | None = None) -> dict:
    """Train the aligned adapter ΔW_a with cfg.alignment.method on top of W0; `out` = the adapter folder.

    Method 'sft' (Table 2's SFT row) trains nothing: the aligned adapter is a copy of the SFT LoRA, applied on the
    raw base. The returned dict's "base" (and out/nlsr_adapter.json) names the base the adapter belongs on, for
    every method: W0, or the raw base for 'sft'. `aligned_base(cfg, w0)` gives the same answer.
    """
    t0 = time.time()
    method = ALIGNMENT.check(cfg.alignment.method)
    w0 = Path(w0)
    if ALIGNMENT.meta(method).get("raw_base"):
        return _copy_sft_adapter(w0, out, t0)
    model, tok = _load(w0, cfg)
    modeling.set_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix=f"nlsr-{method}-") as work:
        trainer = _preference_trainer(method, model, tok, cfg, work, plug)
        pc = cfg.alignment.preference
        result = _run(trainer, pc.n_samples or 0, pc, method, pack=padding_free(pc, plug))
    result["padding_free"] = padding_free(pc, plug)
    modeling.save_adapter(trainer.model, out, extra={"stage": "preference_align", "method": method,
                                                     "base": str(w0), **(extra or {})})
    return {**result, "method": method, "base": str(w0), "n_rows": len(trainer.train_dataset),
            "wall_s": round(time.time() - t0, 2)}


def _copy_sft_adapter(w0: Path, out: Path, t0: float) -> dict:
    src = w0 / SFT_ADAPTER
    modeling.adapter_config(src)  # fails clearly when W0 has no SFT adapter
    raw = raw_base_of(w0)
    with atomic_dir(out, overwrite=True) as tmp:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(src / f, tmp / f)
        (tmp / modeling.ADAPTER_INFO).write_text(json.dumps(modeling.with_base_fingerprint(
            {"stage": "preference_align", "method": "sft", "base": str(raw)}), indent=2))
    return {"method": "sft", "base": str(raw), "losses": [], "steps": 0, "wall_s": round(time.time() - t0, 2)}


def finetune(cfg: ExperimentConfig, base: Path, adapter: Path | None, mix_file: Path, out: Path,
             plug: TrainerPlug | None = None, extra: dict | None = None) -> dict:
    """Harmful fine-tuning on the poisoned mix: keep training `adapter` (ΔW_t starts at ΔW_a, same basis);
    adapter None = a fresh LoRA on `base` (the 'Non-Aligned' baseline). `out` = the fine-tuned adapter.
    `plug` = a fine-tuning-stage defense's trainer; `extra` is recorded in out/nlsr_adapter.json."""
    t0 = time.time()
    rows = data.read_jsonl(mix_file, required=("instruction", "output"))
    model, tok = _load(base, cfg)
    pc_rows = data.as_prompt_completion(rows, cfg.data.template, tok)
    modeling.set_seed(cfg.seed)
    peft_config = None
    if adapter is None:
        peft_config = _fresh_lora(model, cfg)
    else:
        model = modeling.load_adapter(model, adapter, trainable=True)  # checks the adapter fits this base
    with tempfile.TemporaryDirectory(prefix="nlsr-finetune-") as work:
        trainer = _sft_trainer(model, tok, pc_rows, cfg.finetune, cfg, work, peft_config=peft_config, plug=plug)
        result = _run(trainer, len(rows), cfg.finetune, "fine-tuning")
    result["padding_free"] = padding_free(cfg.finetune, plug)
    n_unsafe = sum(r.get("flag") == "unsafe" for r in rows)
    modeling.save_adapter(trainer.model, out, extra={
        "stage": "finetune", "base": str(base), "continued_from": None if adapter is None else str(adapter),
        "mix": str(mix_file), **(extra or {})})
    return {**result, "n_rows": len(rows), "n_unsafe": n_unsafe, "base": str(base),
            "continued_from": None if adapter is None else str(adapter), "wall_s": round(time.time() - t0, 2)}
