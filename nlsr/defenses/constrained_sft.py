"""ConstrainedSFT (defenses-spec §5; Qi et al. 2024, "Safety alignment should be made more than just a few tokens
deep"): fine-tuning with a token-wise constraint towards the model it starts from.

With Δ_t = log π_θ(y_t|x, y_<t) − log π_ref(y_t|x, y_<t) and π_ref = W0 + ΔW_a (the model at the start of
fine-tuning), the paper's objective is E[−Σ_t (2/β_t)·log σ(β_t·Δ_t)]. Its gradient is −Σ_t w_t ∇log π_θ(y_t) with
w_t = 2(1 − σ(β_tΔ_t)) ∈ (0, 2): tokens the model has already moved away from π_ref get less weight, and the
early response tokens (large β_t) are held hardest, which is where shallow alignment lives. As both released codes do,
the trained loss is the weighted NLL −mean_t(w_t·ℓ_t) with w_t detached and clamped below at `min_weight`: same
gradient up to the clamp and the token-mean normalisation. The paper's objective is logged beside it.

π_ref's per-token log-probs are computed once before training, in evaluation mode, and stored by example
(the example's token ids are its key), so every later batch, in any order, reads the same values.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from trl import SFTTrainer

from .. import training
from ..config import ExperimentConfig
from .config import ConstrainedSFTConfig

NAME = "constrained-sft"
STAGE = "finetune"


def beta_schedule(positions: torch.Tensor, c: ConstrainedSFTConfig) -> torch.Tensor:
    """β_t for 1-based response positions t: β·first_token_bias_factor at t = 1, β·bias_factor for
    2 ≤ t ≤ bias_length, β after (0 where t = 0, i.e. outside the response)."""
    betas = torch.full(positions.shape, c.beta, dtype=torch.float32, device=positions.device)
    betas = torch.where((positions >= 2) & (positions <= c.bias_length), c.beta * c.bias_factor, betas)
    betas = torch.where(positions == 1, c.beta * c.first_token_bias_factor, betas)
    return torch.where(positions >= 1, betas, torch.zeros_like(betas))


def token_weights(delta: torch.Tensor, betas: torch.Tensor, min_weight: float) -> torch.Tensor:
    """w_t = max(2(1 − σ(β_tΔ_t)), min_weight), without gradient."""
    return (2 * (1 - torch.sigmoid(betas * delta))).clamp(min=min_weight).detach()


def example_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[int, ...]:
    """An example's identity: its unpadded token ids."""
    return tuple(input_ids[attention_mask.bool()].tolist())


class ConstrainedSFTTrainer(SFTTrainer):
    """SFTTrainer with the token-wise constrained loss against the model as it was when the trainer was built."""

    def __init__(self, *args, constrained: ConstrainedSFTConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.constrained = constrained
        self.ref_logps = self._reference_log_probs()

    @torch.no_grad()
    def _reference_log_probs(self) -> dict[tuple[int, ...], torch.Tensor]:
        """r_t of every training example's label tokens under the initial model (evaluation mode, dataset order)."""
        model, was_training = self.model, self.model.training
        device = next(model.parameters()).device
        ds = self._remove_unused_columns(self.train_dataset, description="reference")
        loader = DataLoader(ds, batch_size=self.args.per_device_train_batch_size, shuffle=False,
                            collate_fn=self.data_collator)
        model.eval()
        out = {}
        try:
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                res = model(**batch, use_cache=False, fused_lm_head=True)
                for ids, att, lp, m in zip(batch["input_ids"], batch["attention_mask"], res.log_probs,
                                           res.label_mask):
                    out[example_key(ids, att)] = lp[m.bool()].float().cpu()
        finally:
            model.train(was_training)
        return out

    def reference_for(self, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        """The stored r_t scattered onto the label positions of a batch (0 elsewhere)."""
        ref = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for row, (ids, att) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"])):
            key = example_key(ids, att)
            if key not in self.ref_logps:
                raise training.TrainingError("ConstrainedSFT: a training example has no reference log-probs "
                                             "(the train set changed after the trainer was built)")
            ref[row][mask[row]] = self.ref_logps[key].to(mask.device)
        return ref

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        c = self.constrained
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        lp, mask = outputs.log_probs, outputs.label_mask.bool()
        ref = self.reference_for(inputs, mask)
        positions = mask.long().cumsum(dim=1) * mask     # t, 1-based inside the response; 0 elsewhere
        betas = beta_schedule(positions, c)
        delta = (lp - ref) * mask
        w = token_weights(delta, betas, c.min_weight) * mask
        # token mean over the micro-batch (over the accumulation window when trl passes its token count)
        n = torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
        loss = -(w * lp).sum() / n
        if model.training:
            with torch.no_grad():
                safe_betas = torch.where(mask, betas, torch.ones_like(betas))
                paper = -((2 / safe_betas) * F.logsigmoid(safe_betas * delta) * mask).sum() / mask.sum().clamp(min=1)
            metrics = self._metrics["train"]
            metrics["constrained_objective"].append(float(paper))
            metrics["constrained_mean_weight"].append(float(w.sum() / mask.sum().clamp(min=1)))
        return (loss, outputs) if return_outputs else loss

    def defense_summary(self) -> dict:
        return {"defense": NAME, "n_reference": len(self.ref_logps), **self.constrained.model_dump()}


def plug(cfg: ExperimentConfig, c: ConstrainedSFTConfig | None = None) -> training.TrainerPlug:
    c = c or cfg.defenses.constrained_sft
    return training.TrainerPlug(ConstrainedSFTTrainer, kwargs={"constrained": c}, args={"adam_beta1": c.adam_beta1})


def finetune(cfg: ExperimentConfig, base: Path, adapter: Path, mix_file: Path, out: Path) -> dict:
    """ConstrainedSFT on the poisoned mix, continuing ΔW_a on W0 (π_ref = W0 + ΔW_a); `out` = the adapter."""
    t0 = time.time()
    result = training.finetune(cfg, base, adapter, mix_file, out, plug=plug(cfg), extra={
        "defense": NAME, "defense_stage": STAGE, **cfg.defenses.constrained_sft.model_dump()})
    return {**result, "defense": NAME, "defense_stage": STAGE, "wall_s": round(time.time() - t0, 2)}
