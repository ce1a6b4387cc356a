"""Recognition of safety-critical neurons: one boolean mask per LoRA factor of the reference adapter (spec A4).

A "neuron" is one entry of a LoRA factor matrix (spec C.7). Methods:

- `lowrank` (default, ActSVD-style): project every factor onto its top-q output directions measured on the
  response-token activations of the calibration set, layer by layer (each layer sees the already-projected
  earlier layers), then keep the top (1 − P_SR) entries of |projected factor|.
  Exact but cheap: instead of storing activations, accumulate per module G = Σ_t (A x_t)(A x_t)ᵀ (r × r, float64)
  over response tokens. G is the Gram matrix of A's score (X Aᵀ) and of B's input, so
  V_A = top-q eigenvectors of G, and for B = QR (thin), V_B = Q · top-q eigenvectors of R G Rᵀ; F ← V Vᵀ F.
  The decoder layers run one at a time over cached per-sample hidden states: pass 1 over layer l (unprojected)
  accumulates its Grams, pass 2 (projected) produces layer l+1's inputs — about two passes over the data in all,
  where the release runs one full forward pass per layer.
- `wanda`: |W| · sqrt(mean over response tokens of the squared input), layer-sequential with pruning.
- `snip`: |W| · Σ_samples |∂L/∂W|, L = NLL of the response tokens (the release's `wandg`).
- `random`: a seeded random score.
The alternatives keep the top fraction *per row*, as the release does; `lowrank` uses ScoringConfig.granularity.

Masks are keyed by the adapter's own weight names (…lora_A.weight / …lora_B.weight) and saved as safetensors.
"""
from __future__ import annotations

import os
import random
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from .atomic import write_json
from .config import ScoringConfig
from .data import format_prompt
from .errors import NLSRError
from .integrity import check_finite
from .methods import SCORERS
from .modeling import load_adapter, load_model, load_tokenizer


class ScoringError(NLSRError):
    """Neuron scoring cannot run (bad calibration data, unsupported model or adapter); the message says why."""


# ---------------------------------------------------------------------------------------------- calibration

def select_calibration(rows: list[dict], cfg: ScoringConfig) -> list[dict]:
    """At most cfg.n_samples rows, drawn with cfg.seed as the release does (shuffle(seed).select(range(n)))."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row or "response" not in row:
            raise ScoringError(f"calibration row {i} needs 'prompt' and 'response' fields, got {row!r:.120}")
    if len(rows) <= cfg.n_samples:
        return list(rows)
    rows = list(rows)
    random.Random(cfg.seed).shuffle(rows)
    return rows[:cfg.n_samples]


def encode_calibration(tokenizer, rows: list[dict], max_length: int, template: str = "alpaca",
                       fmt: str = "paper"):
    """[(input_ids 1×T, response 1×T bool)] as spec A1.4: Alpaca no-input prompt (BOS included), then the response
    truncated to max_length tokens (its own BOS dropped); only response positions count.

    fmt 'code' is the release's formatting (src/prune_regions/data.py): no newline after '### Response:', and the
    response's first token is always dropped (Llama-3's BOS there; a real token for tokenizers without a BOS)."""
    if fmt not in ("paper", "code"):
        raise ScoringError(f"unknown calibration format {fmt!r} (scoring.calibration_format); expected 'paper' or "
                           "'code'")
    if fmt == "code" and template != "alpaca":
        raise ScoringError("scoring.calibration_format 'code' is the release's Alpaca formatting; it needs "
                           f"data.template 'alpaca', got {template!r}")
    samples = []
    for row in rows:
        text = format_prompt(row["prompt"], "", template, tokenizer)
        prompt = tokenizer(text[:-1] if fmt == "code" else text)["input_ids"]  # alpaca ends in "Response:\n"
        if fmt == "code":
            response = tokenizer(row["response"])["input_ids"][1:][:max_length]
        else:
            response = tokenizer(row["response"], truncation=True, max_length=max_length)["input_ids"]
        if fmt == "paper" and response and tokenizer.bos_token_id is not None and response[0] == tokenizer.bos_token_id:
            response = response[1:]
        ids = torch.tensor([prompt + response])
        is_response = torch.zeros_like(ids, dtype=torch.bool)
        is_response[0, len(prompt):] = True
        samples.append((ids, is_response))
    if not any(r.any() for _, r in samples):
        raise ScoringError("the calibration set has no response tokens (all responses empty?)")
    return samples


def labels_of(ids: torch.Tensor, is_response: torch.Tensor) -> torch.Tensor:
    return torch.where(is_response, ids, torch.full_like(ids, -100))


# ---------------------------------------------------------------------------------------------- model structure

def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """{adapter key prefix: LoRA layer}; the prefix is the module's name inside the PeftModel, which is how PEFT
    names the saved weights (prefix + '.lora_A.weight')."""
    from peft.tuners.lora import LoraLayer
    found = {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    if not found:
        raise ScoringError("the reference model has no LoRA layers")
    for name, m in found.items():
        if "default" not in m.lora_A:
            raise ScoringError(f"{name}: expected the adapter under the name 'default'")
        if getattr(m, "use_dora", {}).get("default"):
            raise ScoringError(f"{name}: DoRA adapters are not supported")
    return found


def decoder_layers(peft_model) -> torch.nn.ModuleList:
    inner = getattr(peft_model.get_base_model(), "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ScoringError("layer-sequential scoring needs a decoder-only model with model.model.layers "
                           "(Llama-style)")
    return layers


def modules_by_layer(peft_model) -> list[dict[str, torch.nn.Module]]:
    """LoRA layers grouped by decoder layer, in order; every LoRA layer must sit inside one."""
    lora = lora_layers(peft_model)
    by_id = {id(m): name for name, m in lora.items()}
    groups = [{by_id[id(m)]: m for m in layer.modules() if id(m) in by_id} for layer in decoder_layers(peft_model)]
    grouped = {n for g in groups for n in g}
    outside = sorted(set(lora) - grouped)
    if outside:
        raise ScoringError(f"LoRA modules outside the decoder layers are not supported: {outside[:3]}")
    return groups


# ---------------------------------------------------------------------------------------------- layer streaming

class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(peft_model, samples, device) -> list[list]:
    """[[hidden 1×T×d, layer kwargs, is_response]] per sample: the inputs of decoder layer 0 (only the
    embedding runs; a pre-hook captures the call and stops the forward)."""
    cached = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cached.append([hidden.detach(), dict(kwargs)])
        raise _Stop

    handle = decoder_layers(peft_model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids, _ in samples:
            try:
                peft_model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    for entry, (_, is_response) in zip(cached, samples):
        entry.append(is_response[0].to(device))
    return cached


@torch.no_grad()
def run_layer(layer, cached: list[list], keep_outputs: bool) -> None:
    """Run one decoder layer over every cached sample; with keep_outputs, its outputs replace the inputs."""
    for entry in cached:
        out = layer(entry[0], **entry[1])
        if keep_outputs:
            entry[0] = out[0] if isinstance(out, tuple) else out


class LayerStats:
    """Hooks on the lora_A of each module: per-module Gram of A x over response tokens (float64, r × r) and
    the sum of squared inputs per column (for Wanda), without storing activations."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.gram: dict[str, torch.Tensor] = {}
        self.sq_in: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.positions: torch.Tensor | None = None

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0][0][self.positions].double()
            y = output[0][self.positions].double()
            self.gram[name] = self.gram.get(name, 0) + y.T @ y
            self.sq_in[name] = self.sq_in.get(name, 0) + (x * x).sum(0)
        return hook

    @contextmanager
    def recording(self):
        handles = [m.lora_A["default"].register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def run(self, layer, cached) -> "LayerStats":
        with self.recording(), torch.no_grad():
            for entry in cached:
                self.positions = entry[2]
                self.tokens += int(entry[2].sum())
                layer(entry[0], **entry[1])
        return self


# ---------------------------------------------------------------------------------------------- low-rank projection

def retained_rank(total: int, sparsity: float, rule: str) -> int:
    """q: code int(total·P_SR) (spec C.2, default), paper int(total·(1 − P_SR)); at least 1."""
    frac = sparsity if rule == "code" else 1.0 - sparsity
    return max(1, int(round(total * frac, 9)))


def top_eigvecs(sym: torch.Tensor, q: int) -> torch.Tensor:
    _, vecs = torch.linalg.eigh(sym)  # ascending eigenvalues
    return vecs[:, -q:]


def project_factors(A: torch.Tensor, B: torch.Tensor, G: torch.Tensor, sparsity: float, rule: str):
    """(Â, B̂): each factor projected onto the top-q left singular vectors of its score, from the Gram G alone.

    A's score is S_A = X Aᵀ (T × r); its right singular vectors are the eigenvectors of S_Aᵀ S_A = G.
    B's score is S_B = (X Aᵀ) Bᵀ with S_Bᵀ S_B = B G Bᵀ = Q (R G Rᵀ) Qᵀ for the thin QR B = QR, so its top
    right singular vectors are Q times the top eigenvectors of the r × r matrix R G Rᵀ.
    """
    A64, B64, G = A.double().cpu(), B.double().cpu(), G.double().cpu()
    V_A = top_eigvecs(G, retained_rank(min(A.shape), sparsity, rule))
    Q, R = torch.linalg.qr(B64, mode="reduced")
    V_B = Q @ top_eigvecs(R @ G @ R.T, retained_rank(min(B.shape), sparsity, rule))
    return V_A @ (V_A.T @ A64), V_B @ (V_B.T @ B64)


@torch.no_grad()
def lowrank_project(peft_model, samples, cfg: ScoringConfig, device) -> dict[str, torch.Tensor]:
    """Project every LoRA factor of the model in place, layer-sequentially; return {weight key: projected}."""
    projected = {}
    for modules, stats in layer_sequential(peft_model, samples, device):
        for name, m in modules.items():
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            A_hat, B_hat = project_factors(A, B, stats.gram[name], cfg.sparsity, cfg.rank_rule)
            A.copy_(A_hat.to(A.dtype)), B.copy_(B_hat.to(B.dtype))
            projected[f"{name}.lora_A.weight"] = A_hat.float()
            projected[f"{name}.lora_B.weight"] = B_hat.float()
    return projected


def layer_sequential(peft_model, samples, device):
    """Yield (modules, statistics) per decoder layer with LoRA modules, in order. The caller may change the layer's
    weights before the next iteration: the layer's outputs (the next layer's inputs) are computed after that, so
    each layer sees the already-modified earlier layers, as the release's one-pass-per-layer algorithm does."""
    groups = modules_by_layer(peft_model)
    layers = decoder_layers(peft_model)
    cached = first_layer_inputs(peft_model, samples, device)
    for index, (layer, modules) in enumerate(zip(layers, groups)):
        if modules:
            yield modules, LayerStats(modules).run(layer, cached)
        if index + 1 < len(layers) and any(groups[index + 1:]):
            run_layer(layer, cached, keep_outputs=True)


# ---------------------------------------------------------------------------------------------- other scores

@torch.no_grad()
def wanda_scores(peft_model, samples, cfg: ScoringConfig, device) -> dict[str, torch.Tensor]:
    """|W| · sqrt(mean squared input per column); each layer is pruned to its mask before the next is scored."""
    scores = {}
    for modules, stats in layer_sequential(peft_model, samples, device):
        n = max(stats.tokens, 1)
        for name, m in modules.items():
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            col_a = (stats.sq_in[name] / n).sqrt()
            col_b = (torch.diagonal(stats.gram[name]) / n).sqrt()  # B's input is A x: its squares = diag(G)
            for key, W, col in ((f"{name}.lora_A.weight", A, col_a), (f"{name}.lora_B.weight", B, col_b)):
                scores[key] = (W.double().abs() * col.to(W.device)[None, :]).cpu()
                W.mul_(keep_mask(scores[key], cfg.sparsity, "row").to(W.device, W.dtype))
    return scores


def snip_scores(peft_model, samples, device) -> dict[str, torch.Tensor]:
    """|W| · Σ_samples |∂L/∂W| with L the mean NLL of the response tokens (one sample per backward pass)."""
    params = {}
    for name, m in lora_layers(peft_model).items():
        params[f"{name}.lora_A.weight"] = m.lora_A["default"].weight
        params[f"{name}.lora_B.weight"] = m.lora_B["default"].weight
    for p in peft_model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    grad_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for ids, is_response in samples:
        ids = ids.to(device)
        loss = peft_model(input_ids=ids, labels=labels_of(ids, is_response.to(device)), use_cache=False).loss
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for key, g in zip(params, grads):
            if g is not None:
                grad_sum[key] += g.double().abs()
    return {k: (p.detach().double().abs() * grad_sum[k]).cpu() for k, p in params.items()}


def random_scores(peft_model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in sorted(lora_layers(peft_model).items()):
        for factor in ("A", "B"):
            w = getattr(m, f"lora_{factor}")["default"].weight
            out[f"{name}.lora_{factor}.weight"] = torch.rand(w.shape, generator=g, dtype=torch.float64)
    return out


# ---------------------------------------------------------------------------------------------- masks

def keep_mask(score: torch.Tensor, sparsity: float, granularity: str) -> torch.Tensor:
    """True on the top (1 − sparsity) entries of `score` (per matrix or per row); ties broken by position.

    Counts: numel − int(numel·P_SR) per matrix, d_in − int(d_in·P_SR) per row. (The release's global rule,
    |F| > sorted(|F|)[int(numel·P_SR)], keeps one entry fewer.)
    """
    s = score.detach().double().cpu()
    rows = s.reshape(1, -1) if granularity == "global" else s
    n = rows.shape[1]
    k = n - int(round(n * sparsity, 9))
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.reshape(score.shape)


def save_masks(masks: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file
    out = Path(out)
    check_finite(masks, f"masks for {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """{adapter weight key: bool mask}."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise ScoringError(f"mask file {path} does not exist")
    try:
        masks = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types on a corrupt header
        raise ScoringError(f"{path} is not a safetensors mask file: {err}") from None
    check_finite(masks, path)
    bad = [k for k, v in masks.items() if v.dtype != torch.bool]
    if bad:
        raise ScoringError(f"{path}: mask {bad[0]} is {masks[bad[0]].dtype}, expected bool")
    if not masks:
        raise ScoringError(f"{path} holds no masks")
    return masks


def report_path(out: Path) -> Path:
    return Path(out).with_suffix(".report.json")


# ---------------------------------------------------------------------------------------------- entry point

def lowrank_scores(peft_model, samples, cfg: ScoringConfig, device):
    return {k: v.abs() for k, v in lowrank_project(peft_model, samples, cfg, device).items()}, cfg.granularity


def wanda_entry(peft_model, samples, cfg: ScoringConfig, device):
    return wanda_scores(peft_model, samples, cfg, device), "row"


def snip_entry(peft_model, samples, cfg: ScoringConfig, device):
    return snip_scores(peft_model, samples, device), "row"


def random_entry(peft_model, samples, cfg: ScoringConfig, device):
    return random_scores(peft_model, cfg.seed), "row"


def compute_scores(peft_model, samples, cfg: ScoringConfig, device) -> tuple[dict[str, torch.Tensor], str]:
    """({weight key: score}, granularity) for cfg.method, looked up in nlsr.methods.SCORERS (an unknown name fails
    with the valid ones: it used to run as 'random')."""
    return SCORERS.get(cfg.method)(peft_model, samples, cfg, device)


def score_neurons(base: Path, reference: Path, calibration: list[dict], cfg: ScoringConfig, out: Path,
                  template: str = "alpaca", device: str = "auto", dtype: str = "float32",
                  extra: dict | None = None) -> dict:
    """Write the safety-critical neuron masks of the `reference` adapter (on `base`) to `out` (.safetensors).

    Uses at most cfg.n_samples calibration rows (seeded draw). The report (with `extra`, e.g. where the
    calibration rows came from) lands next to `out` as <stem>.report.json and is returned.
    """
    from .modeling import resolve_device
    start = time.perf_counter()
    dev = resolve_device(device)
    tok = load_tokenizer(base)
    rows = select_calibration(calibration, cfg)
    SCORERS.check(cfg.method)
    samples = (encode_calibration(tok, rows, cfg.max_length, template, cfg.calibration_format)
               if SCORERS.meta(cfg.method).get("calibration") else [])
    model = load_adapter(load_model(base, dtype, str(dev)), reference).eval()
    scores, granularity = compute_scores(model, samples, cfg, dev)
    masks = {k: keep_mask(s, cfg.sparsity, granularity) for k, s in sorted(scores.items())}
    meta = {"method": cfg.method, "sparsity": str(cfg.sparsity), "granularity": granularity,
            "rank_rule": cfg.rank_rule, "calibration_format": cfg.calibration_format, "reference": str(reference)}
    save_masks(masks, Path(out), meta)
    kept = {k: round(m.float().mean().item(), 6) for k, m in masks.items()}
    report = {"stage": "score", **meta, "base": str(base), "out": str(out), "device": str(dev), "dtype": dtype,
              "n_samples": len(rows), "response_tokens": int(sum(int(r.sum()) for _, r in samples)),
              "max_length": cfg.max_length, "n_masks": len(masks),
              "kept_fraction": round(sum(int(m.sum()) for m in masks.values())
                                     / sum(m.numel() for m in masks.values()), 6),
              "kept_per_factor": kept, "wall_s": round(time.perf_counter() - start, 3), **(extra or {})}
    write_json(report, report_path(out))
    return report
