"""The safety reference model: a pre-amplified ("super-aligned") copy of the aligned LoRA adapter (spec A3).

The paper extrapolates W_e = (1+β)·W_a − β·W_0. Because the aligned adapter sits on W_0, this is
ΔW_e = (1+β)·ΔW_a, obtained by scaling B only (mode 'paper'). The released code scales *both* factors by 2β
(mode 'code'), so ΔW_e = (2β)²·ΔW_a (3.24 at β = 0.9, spec C.1). The split of the scale between A and B matters:
realignment transplants factor *entries* (spec C.5), not products.

The output is a PEFT adapter folder with the aligned adapter's config; `reference_report.json` inside it is
written last, so its presence marks a complete reference.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from .atomic import write_json
from .config import TARGETS_ALL, ReferenceConfig
from .modeling import ModelError, adapter_config, adapter_weights, save_adapter_weights

REPORT_NAME = "reference_report.json"


# ---------------------------------------------------------------------------------------------- adapter structure

def lora_modules(weights: dict[str, torch.Tensor], source: str | Path = "adapter") -> list[str]:
    """Names of the LoRA-wrapped modules (key prefix before '.lora_A.weight'), in the model's order.

    Model order = decoder layer, then q, k, v, o, gate, up, down (as the release iterates the parameters); the
    adaptive selection draws one Bernoulli per module in this order, so it must not depend on dict order.
    """
    names = sorted({k.split(".lora_A.")[0] for k in weights if ".lora_A." in k}, key=_model_order)
    for name in names:
        if f"{name}.lora_B.weight" not in weights:
            raise ModelError(f"{source}: {name}.lora_A.weight has no matching {name}.lora_B.weight")
    orphans = [k for k in weights if ".lora_B." in k and k.split(".lora_B.")[0] not in names]
    if orphans:
        raise ModelError(f"{source}: {orphans[0]} has no matching lora_A weight")
    return names


def _model_order(name: str):
    numbers = tuple(int(n) for n in re.findall(r"\.(\d+)\.", name + "."))
    leaf = name.rsplit(".", 1)[-1]
    return numbers, TARGETS_ALL.index(leaf) if leaf in TARGETS_ALL else len(TARGETS_ALL), name


def factor_keys(name: str) -> tuple[str, str]:
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight"


# ---------------------------------------------------------------------------------------------- pre-amplification

def factor_scales(cfg: ReferenceConfig) -> tuple[float, float]:
    """(scale of A, scale of B) for the configured mode."""
    if cfg.mode == "paper":
        return 1.0, 1.0 + cfg.beta
    return 2.0 * cfg.beta, 2.0 * cfg.beta  # release: param = alpha*param + alpha*param


def amplify(weights: dict[str, torch.Tensor], cfg: ReferenceConfig) -> dict[str, torch.Tensor]:
    """The reference factors; tensors other than LoRA A/B (none in a plain LoRA adapter) are copied unchanged."""
    scale_a, scale_b = factor_scales(cfg)
    out = {}
    for key, tensor in weights.items():
        if "lora_magnitude_vector" in key:
            raise ModelError(f"{key}: DoRA adapters are not supported (the magnitude vector does not scale with ΔW)")
        scale = scale_a if ".lora_A." in key else scale_b if ".lora_B." in key else 1.0
        out[key] = (tensor.double() * scale).to(tensor.dtype) if scale != 1.0 else tensor.clone()
    return out


def build_reference(aligned: Path, out: Path, cfg: ReferenceConfig) -> dict:
    """Write the safety reference adapter for `aligned` to `out`; return (and write) a small report."""
    start = time.perf_counter()
    aligned, out = Path(aligned), Path(out)
    config = adapter_config(aligned)
    weights = adapter_weights(aligned)
    modules = lora_modules(weights, aligned)
    if not modules:
        raise ModelError(f"{aligned}: no LoRA A/B weights in adapter_model.safetensors")
    scale_a, scale_b = factor_scales(cfg)
    report = {"stage": "reference", "aligned": str(aligned), "out": str(out), "beta": cfg.beta, "mode": cfg.mode,
              "scale_A": scale_a, "scale_B": scale_b, "delta_w_scale": scale_a * scale_b,
              "n_modules": len(modules), "r": config.get("r"), "lora_alpha": config.get("lora_alpha")}
    save_adapter_weights(aligned, amplify(weights, cfg), out, extra={k: report[k] for k in (
        "stage", "aligned", "beta", "mode", "delta_w_scale")})
    report["wall_s"] = round(time.perf_counter() - start, 3)
    write_json(report, out / REPORT_NAME)
    return report
