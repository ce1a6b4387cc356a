"""Realignment: restore the safety-critical neurons of the fine-tuned adapter from the safety reference (spec A6).

For every LoRA module m (one wrapped linear layer):
1. similarity S_m = cos(W'_t, W'_e) of the masked products W' = (M_B⊙B)(M_A⊙A), computed from r × r products
   (<B1A1, B2A2>_F = tr((B1ᵀB2)(A2A1ᵀ))), so no d_out × d_in matrix is ever formed;
2. adaptive selection (spec A6/A8, the release's centred form): k_m = ascending similarity rank (0 = least
   similar), P_prune = clip(P_L − ε + 2ε·k_m/(N−1), 0, 1), γ_m ~ Bernoulli(P_prune) drawn with a seeded CPU
   torch.Generator (hardware-independent). direction 'paper': patch iff γ_m = 0, so the least similar modules
   are the most likely patched; 'code': patch iff γ_m = 1 (the release's inversion, spec C.3);
3. neuron transplant in the patched modules: A ← A⊙(1−M_A) + A_e⊙M_A, B ← B⊙(1−M_B) + B_e⊙M_B.

Baselines with the same inputs and outputs:
- 'restore-modules': the same selection, but the patched modules' A and B are replaced entirely by the reference.
- 'safelora': the release's SafeLoRA variant (spec D, `--realign_type scale`). With V = B_e A_e (the reference
  product, without the LoRA scale; pass the *aligned* adapter as `reference` to follow the release exactly),
  C = VᵀV / ||V||_F acts on the input side (the release writes ΔWᵀ = AᵀBᵀ and multiplies C from the left, i.e.
  onto lora_A). A module is projected iff cos(ΔW_t C, ΔW_t) < τ, and then A_t ← A_t C (B_t unchanged). The
  original SafeLoRA (Hsu et al.) uses V = W_aligned − W_base and projects the output side; this is not that.
  Masks are not used.

The fine-tuned adapter is read, never written; the result is a new adapter folder with `realign_report.json`
inside it, written last (its presence marks a complete output).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .atomic import write_json
from .config import RealignConfig, validate
from .errors import NLSRError
from .modeling import adapter_config, adapter_weights, save_adapter_weights
from .reference import factor_keys, lora_modules

REPORT_NAME = "realign_report.json"
METHODS = ("nlsr", "safelora", "restore-modules")  # the methods of this module (others: nlsr.methods.REALIGNERS)
CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")


class RealignError(NLSRError):
    """Realignment cannot run; the message names the file and the reason."""


class AdapterMismatch(RealignError):
    """Two adapters (or an adapter and its masks) do not describe the same LoRA modules; names both files."""


# ---------------------------------------------------------------------------------------------- inputs

def _config_value(cfg: dict, field: str):
    value = cfg.get(field)
    return sorted(value) if isinstance(value, list) else value


def check_same_adapter(ref_path: Path, ref_w: dict, ft_path: Path, ft_w: dict) -> list[str]:
    """The module names shared by both adapters; AdapterMismatch on any difference of config, keys or shapes."""
    ref_cfg, ft_cfg = adapter_config(ref_path), adapter_config(ft_path)
    for field in CONFIG_FIELDS:
        a, b = _config_value(ref_cfg, field), _config_value(ft_cfg, field)
        if a != b:
            raise AdapterMismatch(f"reference {ref_path} and fine-tuned {ft_path} differ in {field}: {a} vs {b}")
    only_ref, only_ft = sorted(set(ref_w) - set(ft_w)), sorted(set(ft_w) - set(ref_w))
    if only_ref or only_ft:
        raise AdapterMismatch(f"reference {ref_path} and fine-tuned {ft_path} hold different weights: only in the "
                              f"reference {only_ref[:3]}, only in the fine-tuned {only_ft[:3]}")
    _check_shapes(ref_w, ft_w, ref_w, lambda key, a, b: f"reference {ref_path} and fine-tuned {ft_path}: {key} "
                  f"has shape {a} vs {b} (another base?)")
    modules = lora_modules(ft_w, ft_path)
    if not modules:
        raise AdapterMismatch(f"fine-tuned {ft_path} holds no LoRA A/B weights")
    return modules


def check_masks(masks_path: Path, masks: dict, ft_path: Path, ft_w: dict, modules: list[str]) -> None:
    keys = {k for name in modules for k in factor_keys(name)}
    missing, extra = sorted(keys - set(masks)), sorted(set(masks) - keys)
    if missing or extra:
        raise AdapterMismatch(f"masks {masks_path} do not fit the adapter {ft_path}: missing {missing[:3]}, "
                              f"unknown {extra[:3]}")
    _check_shapes(masks, ft_w, keys, lambda key, a, b: f"masks {masks_path} do not fit the adapter {ft_path}: "
                  f"{key} mask shape {a} vs weight {b}")


def _check_shapes(a: dict, b: dict, keys, message) -> None:
    """AdapterMismatch(message(key, shape in a, shape in b)) at the first key whose tensors differ in shape."""
    for key in keys:
        if a[key].shape != b[key].shape:
            raise AdapterMismatch(message(key, tuple(a[key].shape), tuple(b[key].shape)))


def check_base(base: Path, adapter: Path) -> None:
    """The adapter's shapes fit the base model (built on the meta device from config.json: no weights read), and
    the base is the one the adapter records it was trained on (shapes alone cannot tell W0 from its raw base)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from .modeling import ModelError, check_adapter_fits, check_recorded_base
    base = Path(base)
    if not (base / "config.json").is_file():
        raise ModelError(f"{base} is not a Hugging Face model folder (no config.json)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    try:
        check_adapter_fits(model, adapter)
    except ModelError as err:
        raise ModelError(f"base {base} does not fit: {err}") from None
    check_recorded_base(base, adapter)


# ---------------------------------------------------------------------------------------------- similarity

def frobenius_inner(A1, B1, A2, B2) -> float:
    """<B1 A1, B2 A2>_F = tr((B1ᵀ B2)(A2 A1ᵀ)) from r × r products (float64)."""
    A1, B1, A2, B2 = (t.double() for t in (A1, B1, A2, B2))
    return float(torch.trace((B1.T @ B2) @ (A2 @ A1.T)))


def product_cosine(A1, B1, A2, B2) -> float:
    """cos(vec(B1 A1), vec(B2 A2)); 0 when either product is zero (as torch's eps-guarded cosine gives)."""
    n1, n2 = frobenius_inner(A1, B1, A1, B1), frobenius_inner(A2, B2, A2, B2)
    if n1 <= 0 or n2 <= 0:
        return 0.0
    return frobenius_inner(A1, B1, A2, B2) / (n1 * n2) ** 0.5


def masked_similarity(ft_w, ref_w, masks, name) -> float:
    ka, kb = factor_keys(name)
    ma = masks[ka] if masks is not None else torch.ones_like(ft_w[ka], dtype=torch.bool)
    mb = masks[kb] if masks is not None else torch.ones_like(ft_w[kb], dtype=torch.bool)
    return product_cosine(ft_w[ka] * ma, ft_w[kb] * mb, ref_w[ka] * ma, ref_w[kb] * mb)


# ---------------------------------------------------------------------------------------------- adaptive selection

def similarity_ranks(similarities: list[float]) -> torch.Tensor:
    """Ascending rank k_m in 0..N-1 (0 = least similar); ties keep module order."""
    order = torch.argsort(torch.tensor(similarities, dtype=torch.float64), stable=True)
    ranks = torch.empty(len(similarities), dtype=torch.long)
    ranks[order] = torch.arange(len(similarities))
    return ranks


def prune_probabilities(similarities: list[float], layer_rate: float, epsilon: float) -> torch.Tensor:
    """P_prune = clip(P_L − ε + 2ε·k/(N−1), 0, 1): rises with similarity, mean P_L (one module: P_L)."""
    n = len(similarities)
    norm = similarity_ranks(similarities).double() / (n - 1) if n > 1 else torch.full((n,), 0.5, dtype=torch.float64)
    return (layer_rate - epsilon + 2 * epsilon * norm).clamp(0.0, 1.0)


def release_ranks(similarities: list[float]) -> torch.Tensor:
    """The release's rank k_m in 0..N-1 (0 = least similar): a descending, unstable argsort of the float32
    similarities, so near-equal similarities tie as they do there and ties fall in torch's order for that call
    (for a few modules the earlier of two tied ones ranks higher; the ascending stable order gives the later)."""
    t = torch.tensor(similarities, dtype=torch.float32)
    order = torch.argsort(t, dim=0, descending=True)
    ranks = torch.empty(len(similarities), dtype=torch.long)
    ranks[order] = torch.arange(len(similarities) - 1, -1, -1)
    return ranks


def release_probabilities(similarities: list[float], layer_rate: float, epsilon: float) -> torch.Tensor:
    """P_prune as the release computes it, in float32: ranking values N+1..2 by descending similarity,
    min-max normalised, (P_L − ε) + norm·2ε, clipped. The float32 values are what torch.bernoulli must see for the
    release's draws (from float64 probabilities the same seed gives unrelated draws)."""
    n = len(similarities)
    if n == 1:  # the release divides by a zero range here; one module gets P_L, as prune_probabilities gives
        return torch.tensor([layer_rate], dtype=torch.float32).clamp(0.0, 1.0)
    ranking = (release_ranks(similarities) + 2).to(torch.float32)
    norm = (ranking - ranking.min()) / (ranking.max() - ranking.min())
    return ((layer_rate - epsilon) + norm * (2 * epsilon)).clip(0, 1)


def select_modules(similarities: list[float], cfg: RealignConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patched bool, P_prune, P_patch) per module; one Bernoulli draw per module in module order.

    direction 'code' reproduces the release bit for bit on CPU: its tie order and float32 probabilities."""
    generator = torch.Generator().manual_seed(cfg.seed)  # the CPU stream torch.manual_seed(seed) gives
    if cfg.direction == "code":
        p_prune = release_probabilities(similarities, cfg.layer_rate, cfg.epsilon)
        gamma = torch.bernoulli(p_prune, generator=generator).bool()
        return gamma, p_prune.double(), p_prune.double()
    p_prune = prune_probabilities(similarities, cfg.layer_rate, cfg.epsilon)
    gamma = torch.bernoulli(p_prune, generator=generator).bool()
    return ~gamma, p_prune, 1.0 - p_prune


# ---------------------------------------------------------------------------------------------- edits

def transplant(target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """target⊙(1−M) + source⊙M, as a new tensor in target's dtype."""
    return torch.where(mask, source.to(target.dtype), target)


def safelora_projection(A_t, B_t, A_e, B_e) -> tuple[torch.Tensor, float]:
    """(A_t C, cos(B_t A_t C, B_t A_t)) with C = VᵀV/||V||_F, V = B_e A_e, via r × r products (float64)."""
    A_t64, A_e64, B_e64 = A_t.double(), A_e.double(), B_e.double()
    norm_v = frobenius_inner(A_e64, B_e64, A_e64, B_e64) ** 0.5
    if norm_v == 0:
        return A_t.clone(), 1.0
    A_proj = ((A_t64 @ A_e64.T) @ (B_e64.T @ B_e64) @ A_e64) / norm_v
    return A_proj.to(A_t.dtype), product_cosine(A_proj, B_t, A_t, B_t)


def _changed(old: torch.Tensor, new: torch.Tensor) -> int:
    return int((old != new).sum())


def _selection_edits(ft_w, ref_w, masks, modules, cfg, full: bool):
    """nlsr (full=False) and restore-modules (full=True): similarity, selection, transplant."""
    sims = [masked_similarity(ft_w, ref_w, masks, name) for name in modules]
    patched, p_prune, p_patch = select_modules(sims, cfg)
    ranks = release_ranks(sims) if cfg.direction == "code" else similarity_ranks(sims)
    new, rows = dict(ft_w), []
    for i, name in enumerate(modules):
        changed = masked = 0
        for key in factor_keys(name):
            mask = torch.ones_like(ft_w[key], dtype=torch.bool) if full or masks is None else masks[key]
            masked += int(mask.sum())
            if patched[i]:
                new[key] = transplant(ft_w[key], ref_w[key], mask)
                changed += _changed(ft_w[key], new[key])
        rows.append({"module": name, "similarity": sims[i], "rank": int(ranks[i]), "p_prune": float(p_prune[i]),
                     "p_patch": float(p_patch[i]), "patched": bool(patched[i]), "entries_masked": masked,
                     "entries_changed": changed})
    return new, rows


def _safelora_edits(ft_w, ref_w, modules, cfg):
    new, rows = dict(ft_w), []
    for name in modules:
        ka, kb = factor_keys(name)
        A_proj, sim = safelora_projection(ft_w[ka], ft_w[kb], ref_w[ka], ref_w[kb])
        patched = sim < cfg.safelora_tau
        if patched:
            new[ka] = A_proj
        rows.append({"module": name, "similarity": sim, "patched": bool(patched),
                     "entries_changed": _changed(ft_w[ka], new[ka])})
    return new, rows


# ---------------------------------------------------------------------------------------------- entry point

def _checked_config(cfg: RealignConfig) -> RealignConfig:
    # Re-validate: a config built with model_construct (or mutated) must not bypass the rate checks.
    return validate(cfg.model_dump(), "the realign configuration", RealignConfig)


def realign(base: Path | None, reference: Path, finetuned: Path, masks: Path | None, cfg: RealignConfig,
            out: Path, method: str | None = None) -> dict:
    """Write the realigned adapter to `out` (a new folder) and return the report (also out/realign_report.json)."""
    from .scoring import load_masks
    start = time.perf_counter()
    cfg = _checked_config(cfg)
    method = method or cfg.method
    if method not in METHODS:
        raise RealignError(f"unknown realign method {method!r}; expected one of {list(METHODS)}")
    reference, finetuned, out = Path(reference), Path(finetuned), Path(out)
    if out.resolve() in (finetuned.resolve(), reference.resolve()):
        raise RealignError(f"output {out} is an input adapter; realignment never modifies an adapter in place")
    if base is not None:
        check_base(base, reference), check_base(base, finetuned)
    adapter_config(reference), adapter_config(finetuned)  # a missing folder fails here, naming it
    ref_w, ft_w = adapter_weights(reference), adapter_weights(finetuned)
    modules = check_same_adapter(reference, ref_w, finetuned, ft_w)
    mask_w = None
    if masks is not None and method != "safelora":
        mask_w = load_masks(masks)
        check_masks(Path(masks), mask_w, finetuned, ft_w, modules)
    elif method == "nlsr":
        raise RealignError("method 'nlsr' needs the safety-critical neuron masks (nlsr score)")
    if method == "safelora":
        new, rows = _safelora_edits(ft_w, ref_w, modules, cfg)
    else:
        new, rows = _selection_edits(ft_w, ref_w, mask_w, modules, cfg, full=method == "restore-modules")
    report = {"stage": "realign", "method": method, "n_modules": len(modules),
              "n_patched": sum(r["patched"] for r in rows),
              "entries_changed": sum(r["entries_changed"] for r in rows),
              "entries_total": sum(t.numel() for k, t in ft_w.items() if ".lora_" in k),
              **cfg.settings(method),
              "base": str(base) if base else None, "reference": str(reference),
              "finetuned": str(finetuned), "masks": str(masks) if mask_w is not None else None, "out": str(out),
              "modules": rows}
    save_adapter_weights(finetuned, new, out, extra={k: report[k] for k in (
        "stage", "method", "reference", "finetuned", "masks", "n_patched")})
    report["wall_s"] = round(time.perf_counter() - start, 3)
    write_json(report, out / REPORT_NAME)
    return report


def run_method(paths: dict[str, Path | None], cfg, out: Path, method: str) -> dict:
    """The REALIGNERS entry point of nlsr, safelora and restore-modules (see nlsr.methods)."""
    return realign(paths["base"], paths["reference"], paths["finetuned"], paths.get("masks"), cfg.realign, out,
                   method=method)


def read_report(out: Path) -> dict:
    path = Path(out) / REPORT_NAME
    if not path.is_file():
        raise RealignError(f"{out} has no {REPORT_NAME} (realignment not finished?)")
    return json.loads(path.read_text())

