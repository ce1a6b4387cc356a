"""Antidote (Huang et al., ICML 2025): one-shot Wanda pruning of the fine-tuned adapter on harmful data.

Post-fine-tuning and training-free (defenses-spec §6). The harmful fine-tuning left "harmful" weights in the
adapter; the entries that matter most for producing harmful answers are those with the largest Wanda score on
harmful calibration rows (harmful prompt + harmful answer), so Antidote zeroes them:

1. run the fine-tuned model (W0 + ΔW_t, eval mode) on N calibration rows, Alpaca prompt + answer + EOS, batch 1,
   every token counted; for each LoRA factor F record its input z (x for lora_A, u = A·x unscaled for lora_B) and
   accumulate a_F[j] = (1/N) Σ_n Σ_t z²_{n,t,j} in float32 on the unpruned model;
2. score S_ij = |F_ij| · sqrt(a_F[j]);
3. per row of each factor (not globally), a stable ascending sort keeps the lowest ⌊C(1−d)⌋ entries, C the row
   length; the other C − ⌊C(1−d)⌋ (the highest scores) are set to 0. d is the release's `dense_ratio`: the
   share PRUNED (its naming is inverted), so d = 0 leaves the adapter unchanged.

Only the fine-tuned adapter's factors change; W0 is never written. At LoRA rank 8 a lora_B row has 8 entries, so
every 0 < d ≤ 0.125 prunes exactly one per row: the report gives the realised fraction.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .atomic import write_json
from .config import AntidoteConfig, ExperimentConfig
from .errors import NLSRError
from .modeling import (adapter_weights, check_recorded_base, load_adapter, load_model, load_tokenizer, resolve_device,
                       save_adapter_weights)
from .realign import REPORT_NAME
from .reference import factor_keys, lora_modules


class AntidoteError(NLSRError):
    """Antidote cannot run with these inputs; the message says which and why."""


# ---------------------------------------------------------------------------------------------- calibration

def calibration_rows(cfg: AntidoteConfig) -> list[dict]:
    """The first n_samples {prompt, response} rows of the configured harmful set (file order)."""
    from .data import load
    rows = load(cfg.calibration)
    return [{"prompt": r["prompt"], "response": r["response"]} for r in rows[:cfg.n_samples]]


def check_disjoint(rows: list[dict], cfg: ExperimentConfig) -> None:
    """The calibration prompts must not be evaluation prompts (nor poison rows of the mix)."""
    from .data import harmful_prompts, poison_mix
    d = cfg.data
    seen = {r["prompt"] for r in harmful_prompts(cfg.evaluation.harmful_set)}
    seen |= {r["instruction"] for r in poison_mix(d.task, d.n, d.poison_ratio, d.seed, d.poison_source)
             if r["flag"] == "unsafe"}
    shared = [r["prompt"] for r in rows if r["prompt"] in seen]
    if shared:
        raise AntidoteError(f"realign.antidote.calibration ({cfg.realign.antidote.calibration}) shares "
                            f"{len(shared)} prompts with the evaluation set ({cfg.evaluation.harmful_set}) or the "
                            f"poison rows, e.g. {shared[0][:60]!r}; choose another calibration set")


def encode(tokenizer, rows: list[dict], max_length: int) -> list[torch.Tensor]:
    """[input_ids 1×T]: Alpaca no-input prompt + response + EOS, truncated at max_length (every token counts)."""
    from .data import format_prompt
    eos = tokenizer.eos_token or ""
    return [tokenizer(format_prompt(r["prompt"]) + r["response"] + eos, truncation=True, max_length=max_length,
                      return_tensors="pt")["input_ids"] for r in rows]


# ---------------------------------------------------------------------------------------------- scoring

@torch.no_grad()
def factor_activations(peft_model, samples: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
    """{weight key: a_F} with a_F[j] = (1/N) Σ_n Σ_t z²_{n,t,j} (float32), z the input of factor F."""
    from .scoring import lora_layers
    sums, hooks = {}, []

    def hook(key):
        def fn(module, args):
            z = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + (z * z).sum(dim=0)
        return fn

    for name, layer in lora_layers(peft_model).items():
        ka, kb = factor_keys(name)
        hooks.append(layer.lora_A["default"].register_forward_pre_hook(hook(ka)))
        hooks.append(layer.lora_B["default"].register_forward_pre_hook(hook(kb)))
    try:
        for ids in samples:
            peft_model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / len(samples)).cpu() for k, v in sums.items()}


def wanda_score(weight: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| · sqrt(a[j]) (float32)."""
    return weight.float().abs() * activation.float().sqrt()[None, :]


def prune_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """True where an entry is pruned: per row, all but the ⌊C(1−d)⌋ lowest scores (stable ascending order)."""
    cols = score.shape[1]
    keep = int(cols * (1 - density))  # float product, truncated, as the release computes it
    order = torch.sort(score, dim=1, stable=True).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, keep:], True)
    return mask


# ---------------------------------------------------------------------------------------------- entry point

def antidote(base: Path, finetuned: Path, rows: list[dict], cfg: AntidoteConfig, out: Path,
             device: str = "auto", dtype: str = "float32") -> dict:
    """Write the pruned copy of the `finetuned` adapter (on `base`) to `out`; returns the report."""
    start = time.perf_counter()
    finetuned, out = Path(finetuned), Path(out)
    if out.resolve() == finetuned.resolve():
        raise AntidoteError(f"output {out} is the fine-tuned adapter; Antidote never modifies an adapter in place")
    ft_w = adapter_weights(finetuned)
    modules = lora_modules(ft_w, finetuned)
    if not rows:
        raise AntidoteError("Antidote needs at least one calibration row")
    new = dict(ft_w)
    pruned = total = 0
    activations: dict[str, torch.Tensor] = {}
    if cfg.density > 0:  # d = 0 prunes nothing: skip the forward passes, the copy is bit-identical
        check_recorded_base(base, finetuned)  # same shapes, other weights (raw base for W0) would run silently
        dev = resolve_device(device)
        tok = load_tokenizer(base)
        model = load_adapter(load_model(base, dtype, str(dev)), finetuned).eval()
        activations = factor_activations(model, encode(tok, rows, cfg.max_length), dev)
        del model
    rows_report = []
    for name in modules:
        for key in factor_keys(name):
            w = ft_w[key]
            if cfg.density > 0:
                mask = prune_mask(wanda_score(w, activations[key]), cfg.density)
                new[key] = w.masked_fill(mask, 0)
                n = int(mask.sum())
            else:
                n = 0
            pruned, total = pruned + n, total + w.numel()
            rows_report.append({"factor": key, "pruned": n, "entries": w.numel()})
    report = {"stage": "realign", "method": "antidote", "n_modules": len(modules),
              "n_patched": sum(r["pruned"] > 0 for r in rows_report) // 2, "entries_changed": pruned,
              "entries_total": total, "pruned_fraction": pruned / total if total else 0.0,
              "antidote": cfg.model_dump(), "n_samples": len(rows), "base": str(base), "finetuned": str(finetuned),
              "out": str(out), "factors": rows_report}
    save_adapter_weights(finetuned, new, out, extra={"stage": "realign", "method": "antidote",
                                                     "finetuned": str(finetuned), "density": cfg.density})
    report["wall_s"] = round(time.perf_counter() - start, 3)
    write_json(report, out / REPORT_NAME)
    return report


def run(paths: dict[str, Path | None], cfg: ExperimentConfig, out: Path, method: str = "antidote") -> dict:
    """The REALIGNERS entry point (nlsr.methods): calibration rows from the config, checked disjoint."""
    rows = calibration_rows(cfg.realign.antidote)
    check_disjoint(rows, cfg)
    return antidote(paths["base"], paths["finetuned"], rows, cfg.realign.antidote, out, cfg.model.device,
                    cfg.model.dtype)
