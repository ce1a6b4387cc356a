"""Benchmark: the streaming Gram low-rank scorer (nlsr.scoring) against the released code's algorithm.

The release (spec A4) runs, for every decoder layer l, one full forward pass of the whole model over the
calibration set, stores the response-token inputs of layer l's LoRA factors, takes an SVD of each factor's score
X Fᵀ (randomised: torch.svd_lowrank(q, niter=20)) and projects F ← V Vᵀ F before moving to layer l+1.
`release_lowrank` below is a straightforward re-implementation of that, with an exact SVD (float64) or the
release's randomised one. All variants share one mask rule (nlsr.scoring.keep_mask), so the agreement numbers
measure the projection alone.

Every variant runs in its own subprocess, so that its peak memory (max RSS, or CUDA max allocated) is its own.

    python -m benchmarks.scoring            # SmolLM2-135M, 64 calibration samples, r = 8 on all 7 targets
    python -m benchmarks.scoring --quick    # 16 samples, responses cut to 64 tokens
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("fast", "release-exact", "release-svd_lowrank")


# ---------------------------------------------------------------------------------------------- the release algorithm

@torch.no_grad()
def release_lowrank(peft_model, samples, sparsity: float, rank_rule: str = "code", svd: str = "exact",
                    niter: int = 20, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Layer-sequential ActSVD projection with stored activations and one full forward pass per layer."""
    from nlsr.scoring import modules_by_layer, retained_rank
    torch.manual_seed(seed)  # svd_lowrank draws a random test matrix
    projected = {}
    for modules in modules_by_layer(peft_model):
        if not modules:
            continue
        factors = {f"{n}.lora_{f}.weight": getattr(m, f"lora_{f}")["default"] for n, m in modules.items()
                   for f in ("A", "B")}
        inputs = {k: [] for k in factors}
        state = {}

        def recorder(key):
            def hook(module, args):
                inputs[key].append(args[0][0][state["positions"]].float().cpu())
            return hook

        handles = [lin.register_forward_pre_hook(recorder(k)) for k, lin in factors.items()]
        try:
            for ids, is_response in samples:
                state["positions"] = is_response[0].to(device)
                peft_model(input_ids=ids.to(device), use_cache=False)  # the whole model, as the release does
        finally:
            for h in handles:
                h.remove()
        for key, lin in factors.items():
            F = lin.weight
            X = torch.cat(inputs.pop(key))
            score = X.to(F.device, F.dtype) @ F.T
            q = retained_rank(min(F.shape), sparsity, rank_rule)
            if svd == "exact":
                V = torch.linalg.svd(score.double(), full_matrices=False).Vh[:q].T
            else:
                V = torch.svd_lowrank(score.float(), q=q, niter=niter)[2]
            F_hat = V @ (V.T @ F.to(V.dtype))
            F.copy_(F_hat.to(F.dtype))
            projected[key] = F_hat.float().cpu()
    return projected


# ---------------------------------------------------------------------------------------------- one variant (worker)

def _setup(args):
    from nlsr import data, modeling, scoring
    from nlsr.config import ScoringConfig
    base = modeling.resolve_base(args.base, args.artifact_root)
    cfg = ScoringConfig(sparsity=args.sparsity, n_samples=args.n_samples, max_length=args.max_length)
    tok = modeling.load_tokenizer(base)
    samples = scoring.encode_calibration(tok, data.calibration_set(args.n_samples, seed=42), args.max_length)
    device = modeling.resolve_device(args.device)
    model = modeling.load_adapter(modeling.load_model(base, "float32", str(device)), args.adapter).eval()
    return cfg, samples, model, device


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> None:
    from nlsr import modeling, scoring
    modeling.num_threads_hint()
    cfg, samples, model, device = _setup(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_mb(device)
    start = time.perf_counter()
    if args.worker == "fast":
        projected = scoring.lowrank_project(model, samples, cfg, device)
    else:
        projected = release_lowrank(model, samples, cfg.sparsity, cfg.rank_rule, args.worker.split("-")[1],
                                    device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    masks = {k: scoring.keep_mask(v.abs(), cfg.sparsity, "global") for k, v in projected.items()}
    torch.save({"masks": masks, "projected": projected}, args.result)
    tokens = int(sum(int(r.sum()) for _, r in samples))
    print(json.dumps({"variant": args.worker, "wall_s": wall, "peak_mb": _peak_mb(device),
                      "peak_before_mb": before, "tokens": tokens, "device": str(device)}))


# ---------------------------------------------------------------------------------------------- driver

def make_adapter(base: Path, out: Path, r: int = 8, seed: int = 0) -> Path:
    """PEFT's default A (Kaiming-uniform) and a seeded random B, so ΔW ≠ 0 as after alignment."""
    from nlsr import modeling
    from nlsr.config import LoraConfig
    torch.manual_seed(seed)
    model = modeling.attach_lora(modeling.load_model(base, device="cpu"), LoraConfig(r=r, alpha=2 * r))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return modeling.save_adapter(model, out)


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """(entry agreement, Jaccard of the kept sets, worst per-factor Jaccard) over all factors."""
    same = total = inter = union = 0
    worst = 1.0
    for key in a:
        x, y = a[key], b[key]
        same += int((x == y).sum())
        total += x.numel()
        i, u = int((x & y).sum()), int((x | y).sum())
        inter, union = inter + i, union + u
        worst = min(worst, i / u if u else 1.0)
    return same / total, inter / union, worst


def run_variant(variant: str, args, adapter: Path, result: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scoring", "--worker", variant, "--adapter", str(adapter),
           "--result", str(result), "--base", args.base, "--artifact-root", args.artifact_root,
           "--n-samples", str(args.n_samples), "--max-length", str(args.max_length),
           "--sparsity", str(args.sparsity), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line([r[c] for c in columns]) for r in rows])


def run(args) -> str:
    from nlsr import modeling
    base = modeling.resolve_base(args.base, args.artifact_root)
    with tempfile.TemporaryDirectory(prefix="nlsr-bench-") as tmp:
        tmp = Path(tmp)
        adapter = make_adapter(base, tmp / "adapter", r=args.r)
        stats, masks = {}, {}
        for variant in args.variants:
            stats[variant] = run_variant(variant, args, adapter, tmp / f"{variant}.pt")
            masks[variant] = torch.load(tmp / f"{variant}.pt")["masks"]
            progress = {"variant": variant, "wall_s": round(stats[variant]["wall_s"], 2)}
            if "release-exact" in masks:  # partial results of a long run
                progress["jaccard_vs_release_exact"] = round(agreement(masks[variant], masks["release-exact"])[1], 4)
            print(json.dumps(progress), file=sys.stderr, flush=True)
    ref = "release-exact" if "release-exact" in masks else args.variants[0]
    slow = stats.get("release-exact", stats[args.variants[-1]])["wall_s"]
    rows = []
    for variant in args.variants:
        s = stats[variant]
        entry, jac, worst = agreement(masks[variant], masks[ref])
        rows.append({"variant": variant, "wall s": f"{s['wall_s']:.2f}",
                     "speed-up vs release-exact": f"{slow / s['wall_s']:.1f}x",
                     "peak MB": f"{s['peak_mb']:.0f}",
                     "peak MB over loaded model": f"{s['peak_mb'] - s['peak_before_mb']:.0f}",
                     f"entry agree vs {ref}": f"{entry:.4f}", "Jaccard": f"{jac:.4f}",
                     "worst factor J": f"{worst:.4f}"})
    head = (f"low-rank scoring: base {args.base}, {args.n_samples} calibration samples ({stats[ref]['tokens']} "
            f"response tokens, max_length {args.max_length}), LoRA r={args.r} on 7 targets, P_SR {args.sparsity}, "
            f"q = int(r·P_SR), global top-{1 - args.sparsity:.0%} masks, device {stats[ref]['device']}, "
            f"torch threads {torch.get_num_threads()}")
    return head + "\n" + table(rows, list(rows[0]))


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 samples, responses cut to 64 tokens")
    p.add_argument("--base", default="embedded")
    p.add_argument("--artifact-root", default="runs")
    p.add_argument("--n-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.n_samples = args.n_samples or (16 if args.quick else 64)
    args.max_length = args.max_length or (64 if args.quick else 256)
    return args


def main(argv=None) -> int:
    from nlsr.env import offline_defaults
    offline_defaults()
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
