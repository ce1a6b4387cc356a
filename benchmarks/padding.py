"""Padded vs padding-free batches in the training stages (`padding_free` in alignment.sft / alignment.preference /
finetune): wall time, positions computed, peak memory and the per-step losses, each run in a fresh process on the
same rows.

    python -m benchmarks.padding                    # configs/default.yaml, the embedded SmolLM2, 8 steps a stage
    python -m benchmarks.padding --steps 0          # the stages' own lengths (default cell: 16 + 10 + 50 steps)
    python -m benchmarks.padding --quick            # configs/smoke.yaml, the tiny random model
    python -m benchmarks.padding --stages dpo       # some stages only (sft, dpo, finetune)
    python -m benchmarks.padding --repeats 2        # padded / free / padded / free: a drifting machine hits both

The safety SFT trains on the raw base; the preference alignment (the config's alignment.method, 'dpo' in the table)
and the fine-tuning train a fresh LoRA on it (the same work per step as on W0 / continuing the aligned adapter,
without training those first). 'positions' counts the token positions the model computes: padded, every row of a
batch is as long as its longest row; padding-free, a batch is one sequence of its real tokens, each row attended on
its own (nlsr.packing). The losses should agree to float noise (the same tokens, the same attention); max |Δ loss|
says how closely.
"""
from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "dpo", "finetune")
FIELDS = {"sft": "alignment.sft", "dpo": "alignment.preference", "finetune": "finetune"}


def _child(stage: str, cfg_json: str, queue) -> None:
    from nlsr.env import offline_defaults
    offline_defaults()
    from nlsr import training
    from nlsr.config import ExperimentConfig
    from nlsr.modeling import base_folder
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    base = base_folder(cfg.model, cfg.artifact_root)
    with tempfile.TemporaryDirectory(prefix="nlsr-bench-padding-") as work:
        t0 = time.perf_counter()
        if stage == "sft":
            result = training.safety_sft(cfg, base, Path(work) / "w0")
        elif stage == "dpo":
            result = training.preference_align(cfg, base, Path(work) / "aligned")
        else:
            result = training.finetune(cfg, base, None, _mix(cfg, Path(work)), Path(work) / "ft")
        wall = time.perf_counter() - t0
    queue.put({"wall_s": wall, "losses": [loss for _, loss in result["losses"]],
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _mix(cfg, work: Path) -> Path:
    from nlsr import data
    d = cfg.data
    return data.write_jsonl(data.poison_mix(d.task, d.n, d.poison_ratio, d.seed, d.poison_source), work / "mix.jsonl")


def positions(cfg, stage: str) -> int:
    """Token positions the model computes in the stage's batches (trl's own dataloader, the training's seed)."""
    from nlsr import data, training
    from nlsr.modeling import base_folder
    model, tok = training._load(base_folder(cfg.model, cfg.artifact_root), cfg)
    with tempfile.TemporaryDirectory(prefix="nlsr-bench-padding-") as work:
        if stage == "dpo":  # padded batches; packed as they enter the decoder: their real tokens
            tc = cfg.alignment.preference
            loader = training._preference_trainer(cfg.alignment.method, model, tok, cfg, work).get_train_dataloader()
            return sum(int(b["attention_mask"].sum()) if tc.padding_free else b["input_ids"].numel()
                       for b in itertools.islice(_epochs(loader), _batches(tc, loader)))
        if stage == "sft":
            tc, rows = cfg.alignment.sft, training.sft_rows(cfg, tok)
        else:
            tc = cfg.finetune
            rows = data.as_prompt_completion(data.read_jsonl(_mix(cfg, Path(work))), cfg.data.template, tok)
        trainer = training._sft_trainer(model, tok, rows, tc, cfg, work, peft_config=training._fresh_lora(model, cfg))
        loader = trainer.get_train_dataloader()
        return sum(b["input_ids"].numel() for b in itertools.islice(_epochs(loader), _batches(tc, loader)))


def _batches(tc, loader) -> int:
    return tc.max_steps * tc.grad_accum if tc.max_steps > 0 else math.ceil(len(loader) * tc.epochs)


def _epochs(loader):
    while True:
        yield from loader


def measure(cfg, stage: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(stage, cfg.model_dump_json(), queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"{stage} failed (exit code {proc.exitcode})")
    return queue.get()


def run(path: Path, overrides: list[str], steps: int, stages=STAGES, repeats: int = 1) -> list[dict]:
    """Per stage: padded, padding-free, padded, ... (`repeats` pairs, interleaved so that a drift of the machine's
    speed hits both alike); wall_s is the mean over the repeats, walls lists each."""
    from nlsr.config import load_config
    from nlsr.modeling import base_folder
    rows = []
    for stage in stages:
        field = FIELDS[stage]
        cap = [f"{field}.max_steps={steps}"] if steps else []
        runs = {}
        for _, free in itertools.product(range(repeats), (False, True)):
            cfg = load_config(path, [*overrides, *cap, f"{field}.padding_free={str(free).lower()}"])
            base_folder(cfg.model, cfg.artifact_root)  # converted once, outside the timings
            got = measure(cfg, stage)
            print(f"  {stage} padding_free={free}: {got['wall_s']:.1f} s", file=sys.stderr, flush=True)
            if free in runs:
                runs[free]["walls"].append(got["wall_s"])
            else:
                runs[free] = {**got, "walls": [got["wall_s"]], "positions": positions(cfg, stage)}
        for r in runs.values():
            r["wall_s"] = sum(r["walls"]) / len(r["walls"])
        a, b = runs[False], runs[True]
        rows.append({"stage": stage, "steps": len(a["losses"]), "padded": a, "free": b,
                     "max_dloss": max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | steps | wall s padded → free | speed-up | positions padded → free | peak MB padded → free "
             "| max \\|Δ loss\\| |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["padded"], r["free"]
        each = (f" ({' / '.join(f'{w:.0f}' for w in a['walls'])} → {' / '.join(f'{w:.0f}' for w in b['walls'])})"
                if len(a["walls"]) > 1 else "")
        lines.append(f"| {r['stage']} | {r['steps']} | {a['wall_s']:.1f} → {b['wall_s']:.1f}{each} | "
                     f"{a['wall_s'] / b['wall_s']:.2f}× | {a['positions']:,} → {b['positions']:,} | "
                     f"{a['peak_mb']:,.0f} → {b['peak_mb']:,.0f} | {r['max_dloss']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.padding", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="experiment YAML (default: configs/default.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="configs/smoke.yaml (tiny random model)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per stage (0: the config's own)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to measure")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved padded / padding-free pairs per stage")
    args, _ = ap.parse_known_args(argv)
    path = Path(args.config or ROOT / "configs" / ("smoke.yaml" if args.quick else "default.yaml"))
    rows = run(path, args.overrides, args.steps, args.stages, args.repeats)
    print(f"padded vs padding-free training stages, config {path.name}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
