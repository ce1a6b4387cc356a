"""Helpers for the method tests (reference, scoring, realign, CLI): seeded random LoRA adapters on a tiny Llama."""
from __future__ import annotations

from pathlib import Path

import torch

from nlsr import modeling
from nlsr.config import TARGETS_ALL, LoraConfig


def random_adapter(base: Path, out: Path, r: int = 4, seed: int = 0, targets=None, scale: float = 0.1,
                   alpha: int | None = None, extra: dict | None = None) -> Path:
    """A LoRA adapter on `base` with A and B filled with seeded Gaussian values (B ≠ 0, so ΔW ≠ 0)."""
    cfg = LoraConfig(r=r, alpha=alpha or 2 * r, target_modules=list(targets or TARGETS_ALL))
    model = modeling.attach_lora(modeling.load_model(base, device="cpu"), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return modeling.save_adapter(model, out, extra=extra)


def perturbed_adapter(src: Path, out: Path, seed: int = 1, noise: float = 0.05) -> Path:
    """A 'fine-tuned' adapter: `src` plus seeded noise, same structure (so it shares the aligned basis)."""
    g = torch.Generator().manual_seed(seed)
    weights = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in modeling.adapter_weights(src).items()}
    return modeling.save_adapter_weights(src, weights, out)


def calibration_rows(n: int = 6) -> list[dict]:
    from nlsr.data import calibration_set
    return calibration_set(n, seed=0)
