"""Settings of the training-stage defenses, one trl-style model per defense (every field: default, paper symbol).

Kept apart from the algorithms (which import torch and trl) so that loading a configuration stays cheap, and free of
`nlsr.config` imports so that `nlsr.config` can hold them without an import cycle. `DefensesConfig` is the section
`defenses:` of an experiment; the defaults are the CPU-scale values of docs/defenses-spec.md, the paper-scale values
are in configs/grids/paper-defenses.yaml.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NonAlignedConfig(_Strict):
    """Non-Aligned: the ATTACK on the raw base M_raw with a fresh LoRA (no SFT, no preference alignment).

    It has no knob of its own: data, seed and optimiser are the `finetune` section's, as in the Aligned cell.
    """


class VlguardConfig(_Strict):
    """Vlguard: guard rows (harmful prompt → safe answer) replace task rows in the fine-tuning mix."""
    guard_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="g: the mix holds int(n·g) guard rows, the first ones of the safety-SFT pool (its refusals "
                    "only under alignment.safety_answers: refusals, 130 rows) (default 0.1, as NLSR; 0 = no guard "
                    "rows, the plain poisoned mix)")


class LisaConfig(_Strict):
    """Lisa (bi-state optimisation): K_a alignment micro-steps on guide rows, then K_f fine-tuning micro-steps,
    with the proximal term (ρ/2)·‖w − w̃‖² towards the weights at the start of the current phase."""
    rho: float = Field(1.0, ge=0.0, description="ρ, the proximal coefficient (default 1, as NLSR and Lisa)")
    align_steps: int = Field(2, ge=0, description="K_a, alignment micro-steps per cycle (NLSR 50, Lisa 100, "
                                                   "CPU 2); 0 = no alignment state")
    finetune_steps: int = Field(8, ge=0, description="K_f, fine-tuning micro-steps per cycle (NLSR 200, Lisa 900, "
                                                      "CPU 8)")
    guide_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="guide rows = int(n·guide_fraction) first safe rows of the safety-SFT pool (as Vlguard's "
                    "guard rows: refusals only under alignment.safety_answers: refusals); they also leave "
                    "the fine-tuning mix, which holds n − guide rows (NLSR 100 of n 1000; CPU 0.1 → 40 of 400)")
    proximal_warmup: float = Field(
        0.1, ge=0.0, le=1.0, description="the proximal term is off while step ≤ proximal_warmup·T_tot (the code's "
                                         "0.1: it says the term otherwise hurts accuracy)")


class ConstrainedSFTConfig(_Strict):
    """ConstrainedSFT (Qi et al. 2024, token-wise constrained objective): per response token t,
    loss −(2/β_t)·log σ(β_t·(log π_θ − log π_ref)), π_ref = the model at the start of fine-tuning."""
    beta: float = Field(0.1, gt=0.0, description="β, the constraint strength of late tokens (default 0.1, as "
                                                 "Qi et al. and NLSR)")
    first_token_bias_factor: float = Field(5.0, gt=0.0, description="β_1 = β × this (default 5 → 0.5)")
    bias_factor: float = Field(20.0, gt=0.0, description="β_t = β × this for 2 ≤ t ≤ bias_length (default 20 → 2)")
    bias_length: int = Field(5, ge=1, description="the last response position with the larger β (default 5)")
    min_weight: float = Field(1e-3, ge=0.0, description="the token weight w_t = 2(1 − σ(β_tΔ_t)) is clamped "
                                                        "below at this (the code's 1e-3)")
    adam_beta1: float = Field(0.9, gt=0.0, lt=1.0, description="AdamW β1 (NLSR 0.9; Qi et al. 0.5)")


class VaccineConfig(_Strict):
    """Vaccine (perturbation-aware alignment): each alignment step's gradient is taken with every attention output
    h_l shifted by ε_l = ρ·g_l/‖g‖, g = ∂L/∂h from a first pass (a one-step SAM over hidden states)."""
    rho: float = Field(2.0, ge=0.0, description="ρ, the perturbation radius (default 2, as NLSR and Vaccine)")
    perturb_reference: bool = Field(
        False, description="also perturb the DPO reference forward (the NLSR release's behaviour); default: the "
                           "reference log-probs are computed unperturbed")


class DefensesConfig(_Strict):
    """The defenses' settings (section `defenses:`). Which defenses a cell runs is chosen by the cell's DAG."""
    non_aligned: NonAlignedConfig = NonAlignedConfig()
    vlguard: VlguardConfig = VlguardConfig()
    lisa: LisaConfig = LisaConfig()
    constrained_sft: ConstrainedSFTConfig = ConstrainedSFTConfig()
    vaccine: VaccineConfig = VaccineConfig()
