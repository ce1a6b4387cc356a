"""Vaccine (defenses-spec §3; Huang et al. 2024): perturbation-aware alignment, applied as NLSR does to DPO.

Each alignment step takes its gradient at the worst-case shift of the hidden states within radius ρ, to first order:
pass 1 computes g_l = ∂L/∂h_l for the output h_l of every decoder layer's self-attention module (before the
residual add, as both released codes do), ε_l = ρ·g_l/(‖g‖ + 1e-7) with ‖g‖ the L2 norm over all layers' entries;
pass 2 runs the step with h_l + ε_l (ε a constant: no gradient flows into it), and its parameter gradient is the
update. Pass 1 asks autograd for ∂L/∂h only, so no parameter gradient is computed and gradients accumulated from
earlier micro-batches are left alone (the release's zero_grad between the passes wipes them when GA > 1).

The DPO reference (the adapter-disabled model, computed without gradient inside the loss) stays unperturbed by
default; `perturb_reference` perturbs it too, as the NLSR release does. The Vaccine-aligned adapter stands in for
ΔW_a in its own row of a cell: the DAG step align:vaccine (nlsr.dag), which the undefended fine-tuning
(finetune:vaccine) continues; the cell's other steps keep the undefended ΔW_a.
"""
from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch
from trl import DPOTrainer

from .. import training
from ..config import ExperimentConfig
from .config import VaccineConfig

NAME = "vaccine"
STAGE = "align"
EPS = 1e-7


def attention_modules(model) -> list[torch.nn.Module]:
    """Every decoder layer's self-attention module (Llama/Mistral/Qwen2 naming: `layers.<i>.self_attn`)."""
    mods = [m for n, m in model.named_modules() if n.endswith("self_attn") and ".layers." in f".{n}"]
    if not mods:
        raise training.TrainingError("Vaccine: the model has no `layers.<i>.self_attn` modules to perturb")
    return mods


def perturbation(grads: list[torch.Tensor], rho: float) -> tuple[list[torch.Tensor], float]:
    """ε_l = ρ·g_l/(‖g‖ + 1e-7), ‖g‖ = sqrt(Σ_l ‖g_l‖_F²); also returns ‖g‖."""
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    return [(rho * g / (norm + EPS)).detach() for g in grads], float(norm)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, h):
    return (h, *output[1:]) if isinstance(output, tuple) else h


@contextlib.contextmanager
def capture_attention(modules):
    """Collect the attention outputs of the forwards that build a graph (the policy's, not the no-grad reference)."""
    seen: list[torch.Tensor] = []

    def hook(mod, args, output):
        if torch.is_grad_enabled() and _first(output).requires_grad:
            seen.append(_first(output))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def perturb_attention(modules, eps: list[torch.Tensor], perturb_reference: bool = False):
    """Add ε_l to module l's output in every grad-enabled forward (and in no-grad ones if `perturb_reference`)."""
    by_module = dict(zip(modules, eps))

    def hook(mod, args, output):
        if torch.is_grad_enabled() or perturb_reference:
            return _replace_first(output, _first(output) + by_module[mod].to(_first(output).dtype))
        return None

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class VaccineDPOTrainer(DPOTrainer):
    """DPOTrainer whose every step is Vaccine's two-pass, hidden-state-perturbed step."""

    def __init__(self, *args, vaccine: VaccineConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.vaccine = vaccine
        self.trace: list[dict] = []   # per micro-step: pass-1 / pass-2 loss, ‖g‖, ‖ε‖

    def perturbation_for(self, model, inputs) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """Pass 1: the loss, and ε per attention module from ∂L/∂h (no parameter gradient is computed)."""
        modules = attention_modules(model)
        saved = copy.deepcopy(self._metrics["train"])   # pass 1 is not a logged step
        with capture_attention(modules) as hs, self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        self._metrics["train"] = saved
        if len(hs) != len(modules):
            raise training.TrainingError(f"Vaccine: expected one graph-building forward per attention module "
                                         f"({len(modules)}), saw {len(hs)} outputs")
        grads = torch.autograd.grad(loss, hs)
        eps, norm = perturbation(list(grads), self.vaccine.rho)
        return eps, loss.detach(), norm

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        eps, loss1, norm = self.perturbation_for(model, inputs)
        with perturb_attention(attention_modules(model), eps, self.vaccine.perturb_reference):
            loss2 = super().training_step(model, inputs, num_items_in_batch)
        eps_norm = float(torch.sqrt(sum((e.float() ** 2).sum() for e in eps)))
        self.trace.append({"loss_unperturbed": float(loss1), "loss_perturbed": float(loss2) *
                           self.current_gradient_accumulation_steps, "grad_norm_h": norm, "eps_norm": eps_norm})
        self._metrics["train"]["vaccine_loss_unperturbed"].append(float(loss1))
        self._metrics["train"]["vaccine_grad_norm_h"].append(norm)
        return loss2

    def defense_summary(self) -> dict:
        gap = [t["loss_perturbed"] - t["loss_unperturbed"] for t in self.trace]
        return {"defense": NAME, "rho": self.vaccine.rho, "perturb_reference": self.vaccine.perturb_reference,
                "steps": len(self.trace), "mean_loss_gap": sum(gap) / len(gap) if gap else 0.0}


def plug(cfg: ExperimentConfig, vc: VaccineConfig | None = None) -> training.TrainerPlug:
    if cfg.alignment.method != "dpo":
        raise training.TrainingError(f"Vaccine perturbs DPO alignment: alignment.method must be 'dpo', got "
                                     f"{cfg.alignment.method!r}")
    return training.TrainerPlug(VaccineDPOTrainer, kwargs={"vaccine": vc or cfg.defenses.vaccine})


def align(cfg: ExperimentConfig, w0: Path, out: Path) -> dict:
    """Vaccine-DPO on W0: the aligned adapter A_vac that replaces ΔW_a; `out` = the adapter folder."""
    t0 = time.time()
    vc = cfg.defenses.vaccine
    result = training.preference_align(cfg, w0, out, plug=plug(cfg, vc),
                                        extra={"defense": NAME, "defense_stage": STAGE, **vc.model_dump()})
    return {**result, "defense": NAME, "defense_stage": STAGE, "wall_s": round(time.time() - t0, 2)}
