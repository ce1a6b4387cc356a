"""Lisa (defenses-spec §4): bi-state optimisation of the fine-tuned adapter with a proximal term.

The fine-tuning loop is trl's SFTTrainer over the task mix; `LisaTrainer.training_step` decides, micro-batch by
micro-batch, which state it is in: K_a alignment micro-steps on the guide rows (safe answers from the cell's
safety-SFT pool, as Vlguard's guard rows: refusals only under `alignment.safety_answers: refusals`), then K_f fine-tuning
micro-steps on the mix, repeated. While aligning, the mix batch the loop drew is discarded, as in the original code
(so about K_a/(K_a+K_f) of the task data goes unused). Both states train the one continued adapter ΔW_a with one
AdamW state and one LR schedule. After the first `proximal_warmup`·T_tot micro-steps the loss gains
(ρ/2)·Σ‖w − w̃‖², w̃ = the trainable weights at the start of the current phase (the other state's last iterate):
w̃_F in the alignment state, w̃_A in the fine-tuning state, as `trainer.py` of the Lisa release (its README swaps
them). The phase clock counts micro-batches, so gradient accumulation must be 1 (else phases mix gradients).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler
from trl import SFTTrainer

from .. import data, training
from ..config import ExperimentConfig
from .config import LisaConfig
from .vlguard import guard_mix, guard_rows

NAME = "lisa"
MIX_FILE = "mix.jsonl"  # inside the adapter folder: the rows it fine-tuned on
STAGE = "finetune"
ALIGN, FINETUNE = "align", "finetune"


def n_guide(cfg: ExperimentConfig) -> int:
    return data.n_poison(cfg.data.n, cfg.defenses.lisa.guide_fraction)


def task_rows(cfg: ExperimentConfig) -> list[dict]:
    """Lisa's fine-tuning rows: int(n·p) poison rows and the first n − int(n·p) − guide task rows, shuffled with
    the data seed (the guide rows leave the mix, as NLSR's Lisa script builds it)."""
    d, k = cfg.data, n_guide(cfg)
    rows = guard_mix(d.task, d.n, d.poison_ratio, cfg.defenses.lisa.guide_fraction, d.seed, d.poison_source,
                     cfg.alignment.answer_filter())
    return [r for r in rows if r["flag"] != "safe"] if k else rows


def write_mix(cfg: ExperimentConfig, out_file: Path) -> Path:
    return data.write_jsonl(task_rows(cfg), out_file)


class LisaTrainer(SFTTrainer):
    """SFTTrainer whose micro-steps alternate between alignment (guide rows) and fine-tuning (the train set)."""

    def __init__(self, *args, guide_rows: list[dict], lisa: LisaConfig, template: str = "alpaca", **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise training.TrainingError("Lisa counts its phases in micro-batches: finetune.grad_accum must be 1, "
                                         f"got {self.args.gradient_accumulation_steps}")
        self.lisa = lisa
        self.n_guide = len(guide_rows)
        self.guide_ids: set[tuple[int, ...]] = set()
        self._guide_loader = None
        if guide_rows:
            from datasets import Dataset
            rows = data.as_prompt_completion(guide_rows, template, self.processing_class)
            ds = self._prepare_dataset(Dataset.from_list(rows), self.processing_class, self.args, False, None,
                                       "guide")
            ds = self._remove_unused_columns(ds, description="guide")
            self.guide_ids = {tuple(x) for x in ds["input_ids"]}
            # a seeded random sampler that restarts when exhausted (the original's alignment loader)
            sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(self.args.seed))
            self._guide_loader = DataLoader(ds, batch_size=self.args.per_device_train_batch_size, sampler=sampler,
                                            collate_fn=self.data_collator)
        self._guide_iter = None
        self.status = ALIGN if lisa.align_steps > 0 and self.n_guide > 0 else FINETUNE
        self.clock = self.step = 0
        self.anchors: dict[str, dict[str, torch.Tensor]] | None = None   # w̃_A ("align"), w̃_F ("finetune")
        self.trace: list[dict] = []   # per micro-step: state, switched, proximal value, row token hashes
        self._proximal_on = False

    # ---------------------------------------------------------------- state machine

    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._weights().items()}

    def _next_guide_batch(self) -> dict:
        if self._guide_iter is None:
            self._guide_iter = iter(self._guide_loader)
        try:
            return next(self._guide_iter)
        except StopIteration:
            self._guide_iter = iter(self._guide_loader)
            return next(self._guide_iter)

    def _schedule(self, task_batch: dict) -> tuple[dict, bool]:
        """Advance the bi-state machine by one micro-step; return the batch to train on and whether it switched."""
        la, switched = self.lisa, False
        if self.status == ALIGN:
            if la.finetune_steps != 0 and self.step != 0 and self.clock % la.align_steps == 0:
                self.status, switched, self.clock = FINETUNE, True, 0
                self.anchors[ALIGN] = self._snapshot()
        elif la.align_steps != 0 and self.n_guide > 0 and self.step != 0 and self.clock % la.finetune_steps == 0:
            self.status, switched, self.clock = ALIGN, True, 0
            self.anchors[FINETUNE] = self._snapshot()
        return (self._next_guide_batch() if self.status == ALIGN else task_batch), switched

    def anchor(self) -> dict[str, torch.Tensor]:
        """The proximal anchor of the current state: w̃_F while aligning, w̃_A while fine-tuning."""
        return self.anchors[FINETUNE if self.status == ALIGN else ALIGN]

    def proximal_term(self) -> torch.Tensor:
        """(ρ/2)·Σ_tensors ‖w − anchor‖_F², differentiable in w (gradient ρ(w − anchor))."""
        anchor = self.anchor()
        total = sum(((p - anchor[n]) ** 2).sum() for n, p in self._weights().items())
        return 0.5 * self.lisa.rho * total

    def total_micro_steps(self) -> int:
        """T_tot: the fine-tuning loader's micro-batches over the whole run."""
        return int(self.state.max_steps) * self.args.gradient_accumulation_steps

    # ---------------------------------------------------------------- trl hooks

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.anchors is None:   # both anchors start at w0
            w0 = self._snapshot()
            self.anchors = {ALIGN: w0, FINETUNE: w0}
        batch, switched = self._schedule(inputs)
        if self.status == ALIGN:
            num_items_in_batch = None   # the task batch's token count does not apply: token mean of this batch
        self._proximal_on = self.lisa.rho > 0 and self.step > self.lisa.proximal_warmup * self.total_micro_steps()
        self.trace.append({"step": self.step, "state": self.status, "switched": switched,
                           "rows": [hash(tuple(ids[m.bool()].tolist()))
                                    for ids, m in zip(batch["input_ids"], batch["attention_mask"])]})
        loss = super().training_step(model, batch, num_items_in_batch)
        self.step += 1
        self.clock += 1
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not (self._proximal_on and model.training):
            if self.trace and model.training:
                self.trace[-1]["proximal"] = 0.0
            return out
        prox = self.proximal_term()
        self.trace[-1]["proximal"] = float(prox.detach())
        self._metrics["train"]["lisa_proximal"].append(float(prox.detach()))
        if return_outputs:
            return out[0] + prox, out[1]
        return out + prox

    def defense_summary(self) -> dict:
        n_align = sum(t["state"] == ALIGN for t in self.trace)
        return {"defense": NAME, "align_steps": n_align, "finetune_steps": len(self.trace) - n_align,
                "switches": sum(t["switched"] for t in self.trace), "n_guide": self.n_guide,
                "rho": self.lisa.rho}


def plug(cfg: ExperimentConfig, lisa: LisaConfig | None = None) -> training.TrainerPlug:
    """The trainer that makes `training.finetune` run Lisa with the guide rows of `cfg`."""
    lisa = lisa or cfg.defenses.lisa
    if cfg.finetune.grad_accum != 1:
        raise training.TrainingError("Lisa counts its phases in micro-batches: finetune.grad_accum must be 1, "
                                     f"got {cfg.finetune.grad_accum}")
    return training.TrainerPlug(LisaTrainer, kwargs={"guide_rows": guard_rows(n_guide(cfg), cfg.alignment.answer_filter()),
                                                     "lisa": lisa,
                                                     "template": cfg.data.template})


def finetune(cfg: ExperimentConfig, base: Path, adapter: Path, mix_file: Path | None, out: Path) -> dict:
    """Lisa continuing ΔW_a on W0; `out` = the fine-tuned adapter, which also keeps its fine-tuning rows
    (out/mix.jsonl). `mix_file` (the cell's plain poisoned mix) is not read: Lisa's rows (the mix without the
    guide rows' share) are rebuilt from the same data settings, so they hold the same poison rows."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="nlsr-lisa-") as work:
        mix = write_mix(cfg, Path(work) / MIX_FILE)
        result = training.finetune(cfg, base, adapter, mix, out, plug=plug(cfg), extra={
            "defense": NAME, "defense_stage": STAGE, **cfg.defenses.lisa.model_dump()})
        shutil.copy2(mix, Path(out) / MIX_FILE)
    return {**result, "defense": NAME, "defense_stage": STAGE, "wall_s": round(time.time() - t0, 2)}
