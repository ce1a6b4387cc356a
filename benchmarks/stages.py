"""Time and peak memory of every pipeline stage, each in a fresh process (the library functions, no orchestration).

    python -m benchmarks.stages                              # configs/default.yaml: the embedded SmolLM2, ~10 min
    python -m benchmarks.stages --quick                      # configs/smoke.yaml: the tiny random model, ~1 min
    python -m benchmarks.stages --config configs/paper.yaml --set model.path=...   # on a GPU

A stage's peak memory is the maximum resident set size of its own process (imports of torch and the HF stack
included; the `imports` row shows that floor), so stages do not inherit each other's peaks.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["imports", "base", "poison", "sft", "align", "reference", "score", "finetune", "realign", "evaluate"]


def _paths(work: Path) -> dict[str, Path]:
    return {"mix": work / "mix.jsonl", "w0": work / "w0", "aligned": work / "aligned", "reference": work / "ref",
            "masks": work / "masks.safetensors", "finetuned": work / "ft", "realigned": work / "realigned",
            "eval": work / "eval"}


def _stage(name: str, cfg, p: dict[str, Path]) -> None:
    from nlsr import data, modeling, realign, reference, scoring, training
    from nlsr.evaluation import evaluate
    base = modeling.base_folder(cfg.model, cfg.artifact_root) if name != "imports" else None
    if name == "poison":
        data.write_jsonl(data.poison_mix(cfg.data.task, cfg.data.n, cfg.data.poison_ratio, cfg.data.seed,
                                         cfg.data.poison_source), p["mix"])
    elif name == "sft":
        training.safety_sft(cfg, base, p["w0"])
    elif name == "align":
        training.preference_align(cfg, p["w0"], p["aligned"])
    elif name == "reference":
        reference.build_reference(p["aligned"], p["reference"], cfg.reference)
    elif name == "score":
        calib = data.calibration_set(cfg.scoring.n_samples, cfg.scoring.seed)
        scoring.score_neurons(training.aligned_base(cfg, p["w0"]), p["reference"], calib, cfg.scoring, p["masks"],
                              cfg.data.template, cfg.model.device, cfg.model.dtype)
    elif name == "finetune":
        training.finetune(cfg, training.aligned_base(cfg, p["w0"]), p["aligned"], p["mix"], p["finetuned"])
    elif name == "realign":
        realign.realign(training.aligned_base(cfg, p["w0"]), p["reference"], p["finetuned"], p["masks"], cfg.realign,
                        p["realigned"])
    elif name == "evaluate":
        evaluate(cfg, training.aligned_base(cfg, p["w0"]), p["realigned"], p["eval"])


def _child(name: str, cfg_json: str, work: str, queue) -> None:
    from nlsr.env import offline_defaults
    offline_defaults()
    t_import = time.perf_counter()
    from nlsr.config import ExperimentConfig
    import nlsr.training  # noqa: F401  (the heavy imports, timed apart from the stage)
    t0 = time.perf_counter()
    _stage(name, ExperimentConfig.model_validate_json(cfg_json), _paths(Path(work)))
    queue.put({"stage": name, "wall_s": time.perf_counter() - t0, "import_s": t0 - t_import,
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run(cfg, work: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for name in STAGES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, cfg.model_dump_json(), str(work), queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"stage {name} failed (exit code {proc.exitcode})")
        rows.append(queue.get())
        print(f"  {name}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | wall s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} |" for r in rows]
    total = sum(r["wall_s"] for r in rows if r["stage"] != "imports")
    lines.append(f"| **all stages** | {total:.1f} | {max(r['peak_mb'] for r in rows):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="experiment YAML (default: configs/default.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="configs/smoke.yaml (tiny random model)")
    ap.add_argument("--artifact-root", default=None, help="where base models are cached (default: runs)")
    args, _ = ap.parse_known_args(argv)
    from nlsr.config import load_config
    path = args.config or ROOT / "configs" / ("smoke.yaml" if args.quick else "default.yaml")
    extra = [f"artifact_root={args.artifact_root}"] if args.artifact_root else []
    cfg = load_config(path, [*args.overrides, *extra])
    with tempfile.TemporaryDirectory(prefix="nlsr-bench-stages-") as work:
        rows = run(cfg, Path(work))
    print(f"pipeline stages, config {Path(path).name} ({cfg.model.source} model, device {cfg.model.device})")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
