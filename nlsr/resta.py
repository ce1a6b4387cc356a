"""RESTA (Bhardwaj et al., ACL 2024): add a safety vector back to the compromised fine-tuned model.

Post-fine-tuning weight arithmetic (defenses-spec §7). The safety vector is the difference between the aligned
model and its *unaligned* counterpart (the aligned model fine-tuned on harmful QA): δ = θ_aligned − θ_unaligned,
and the defended model is θ = θ_sft + γ·δ. In LoRA deltas on W0 (W0 cancels), per target module:

    δ = ΔW_a − ΔW_u,   τ = ΔW_t − ΔW_a,   D = ΔW_a + τ' + γ·δ   (τ' = τ without DARE)

- q = 0 (default): D = ΔW_t + γ(ΔW_a − ΔW_u) is written as an exact LoRA by stacking ranks:
  B' = [s·B_t, γs·B_a, −γs·B_u], A' = [A_t; A_a; A_u], scaling 1 (rank 3r); γ = 0 returns ΔW_t itself.
- q > 0: DARE on the task delta, τ' = M ⊙ τ / (1 − q), M ~ Bernoulli(1 − q) from a seeded generator. τ' is full
  rank, so D is written as a LoRA truncated by SVD to rank 3r, and the relative error of that truncation is
  reported per module and overall (the spec allows a truncated LoRA only with its error).
- 'resta-base' takes θ_u := W0 (δ = ΔW_a): used by some re-implementations, not the paper's method.

The unaligned adapter ΔW_u comes from the 'unalign' stage (`train_unaligned`): the aligned adapter continued on
harmful-only rows that are disjoint from the poisoned mix, with the attack's template and loss.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .atomic import write_json
from .config import ExperimentConfig, FinetuneConfig, RestaConfig
from .errors import NLSRError
from .modeling import adapter_config, adapter_weights, save_adapter_weights
from .realign import REPORT_NAME, check_same_adapter
from .reference import factor_keys


class RestaError(NLSRError):
    """RESTA cannot run with these inputs; the message says which and why."""


# ---------------------------------------------------------------------------------------------- θ_u

def train_unaligned(cfg: ExperimentConfig, base: Path, aligned: Path, out: Path) -> dict:
    """ΔW_u: the aligned adapter continued on the harmful rows of realign.unaligned (the 'unalign' stage)."""
    from . import data, training
    u = cfg.realign.unaligned
    rows = [{"instruction": r["prompt"], "input": "", "output": r["response"], "flag": "unsafe"}
            for r in data.load(u.source)]
    ft = FinetuneConfig(**u.model_dump(exclude={"source"}))
    with tempfile.TemporaryDirectory(prefix="nlsr-unalign-") as tmp:
        mix = data.write_jsonl(rows, Path(tmp) / "harmful.jsonl")
        result = training.finetune(cfg.model_copy(update={"finetune": ft}), Path(base), Path(aligned), mix, out)
    return {**result, "source": u.source}


# ---------------------------------------------------------------------------------------------- arithmetic

def scaling(cfg: dict) -> float:
    """s = α/r of a LoRA adapter config (rsLoRA: α/√r)."""
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r


def dare(tau: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability `rate`, rescale the survivors by 1/(1 − rate); rate 0: identity."""
    if rate == 0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) >= rate
    return torch.where(keep, tau / (1 - rate), torch.zeros_like(tau))


def stacked(A_t, B_t, A_a, B_a, A_u, B_u, s: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B'A' = s·B_t A_t + γ s (B_a A_a − B_u A_u) (A_u/B_u None: resta-base, θ_u = W0)."""
    As, Bs = [A_t, A_a], [s * B_t, gamma * s * B_a]
    if A_u is not None:
        As.append(A_u)
        Bs.append(-gamma * s * B_u)
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def dense_delta(A_t, B_t, A_a, B_a, A_u, B_u, s: float, cfg: RestaConfig, generator) -> torch.Tensor:
    """D = ΔW_a + DARE(ΔW_t − ΔW_a) + γ(ΔW_a − ΔW_u), float64 (ΔW_u = 0 when A_u is None)."""
    dw = lambda B, A: s * (B.double() @ A.double())  # noqa: E731
    w_a, w_t = dw(B_a, A_a), dw(B_t, A_t)
    w_u = dw(B_u, A_u) if A_u is not None else torch.zeros_like(w_a)
    return w_a + dare(w_t - w_a, cfg.dare_rate, generator) + cfg.gamma * (w_a - w_u)


def truncated_lora(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative Frobenius error) of the best rank-`rank` approximation B A of D (SVD)."""
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = min(rank, S.numel())
    B, A = U[:, :k] * S[:k], Vh[:k]
    norm = float(torch.linalg.norm(D))
    err = float(torch.linalg.norm(D - B @ A)) / norm if norm > 0 else 0.0
    return A, B, err


# ---------------------------------------------------------------------------------------------- entry point

def resta(aligned: Path, finetuned: Path, unaligned: Path | None, cfg: RestaConfig, out: Path,
          method: str = "resta") -> dict:
    """Write the RESTA adapter (W0 + D per module) to `out`; unaligned None is 'resta-base'. Returns the report."""
    start = time.perf_counter()
    aligned, finetuned, out = Path(aligned), Path(finetuned), Path(out)
    inputs = [aligned, finetuned] + ([Path(unaligned)] if unaligned is not None else [])
    if out.resolve() in {p.resolve() for p in inputs}:
        raise RestaError(f"output {out} is an input adapter; RESTA never modifies an adapter in place")
    a_w, t_w = adapter_weights(aligned), adapter_weights(finetuned)
    modules = check_same_adapter(aligned, a_w, finetuned, t_w)
    u_w = None
    if unaligned is not None:
        u_w = adapter_weights(unaligned)
        check_same_adapter(aligned, a_w, Path(unaligned), u_w)
    acfg = adapter_config(finetuned)
    s, r = scaling(acfg), int(acfg["r"])
    report = {"stage": "realign", "method": method, "n_modules": len(modules), "resta": cfg.model_dump(),
              "aligned": str(aligned), "finetuned": str(finetuned),
              "unaligned": str(unaligned) if unaligned is not None else None, "out": str(out)}
    if cfg.gamma == 0 and cfg.dare_rate == 0:  # θ = θ_sft exactly: the fine-tuned adapter, bit for bit
        save_adapter_weights(finetuned, dict(t_w), out, extra={"stage": "realign", "method": method})
        report.update(n_patched=0, entries_changed=0, rank=r)
    else:
        generator = torch.Generator().manual_seed(cfg.dare_seed)
        new, errors = {}, []
        stack = 2 if u_w is None else 3
        for name in modules:
            ka, kb = factor_keys(name)
            args = (t_w[ka], t_w[kb], a_w[ka], a_w[kb], u_w[ka] if u_w else None, u_w[kb] if u_w else None)
            if cfg.dare_rate == 0:
                new[ka], new[kb] = stacked(*args, s, cfg.gamma)
            else:
                A, B, err = truncated_lora(dense_delta(*args, s, cfg, generator), stack * r)
                new[ka], new[kb] = A.to(t_w[ka].dtype), B.to(t_w[kb].dtype)
                errors.append({"module": name, "relative_error": err})
        rank = stack * r
        save_adapter_weights(finetuned, new, out, extra={"stage": "realign", "method": method},
                             config_update={"r": rank, "lora_alpha": rank, "use_rslora": False,
                                            "rank_pattern": {}, "alpha_pattern": {}})
        report.update(n_patched=len(modules), entries_changed=sum(t.numel() for t in new.values()), rank=rank)
        if errors:
            report["svd_relative_error"] = max(e["relative_error"] for e in errors)
            report["modules"] = errors
    report["wall_s"] = round(time.perf_counter() - start, 3)
    write_json(report, out / REPORT_NAME)
    return report


def run(paths: dict[str, Path | None], cfg: ExperimentConfig, out: Path, method: str = "resta") -> dict:
    """The REALIGNERS entry point of 'resta' and 'resta-base' (nlsr.methods)."""
    return resta(paths["aligned"], paths["finetuned"], paths.get("unaligned"), cfg.realign.resta, out, method)
