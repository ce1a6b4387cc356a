"""Time and peak memory of every pipeline stage, each in a fresh process (the library functions, no orchestration).

    python -m benchmarks.stages                              # configs/default.yaml: the embedded SmolLM2, ~10 min
    python -m benchmarks.stages --quick                      # configs/smoke.yaml: the tiny random model, ~1 min
    python -m benchmarks.stages --config configs/paper.yaml --set model.path=...   # on a GPU

The steps are those of one cell, read from its DAG description (`nlsr.dag.steps`): every post-fine-tuning
defense in realign.method / realign.baselines, every fine-tuning-stage defense in finetune.defenses, and the
evaluation of each variant. A step's peak memory is the maximum resident set size of its own process (imports of
torch and the HF stack included; the `imports` row shows that floor), so steps do not inherit each other's peaks.
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


def _folder(work: Path, label: str) -> Path:
    return work / label.replace(":", "-")


def _child(label: str, cfg_json: str, work: str, queue) -> None:
    """Run one DAG step (nlsr.dag.run_step, the body the Prefect task runs too) on the outputs of earlier steps."""
    from nlsr.env import offline_defaults
    offline_defaults()
    t_import = time.perf_counter()
    from nlsr import dag
    from nlsr.config import ExperimentConfig
    import nlsr.training  # noqa: F401  (the heavy imports, timed apart from the stage)
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    t0 = time.perf_counter()
    if label != "imports":
        from nlsr.modeling import base_folder
        steps = {s.label: s for s in dag.steps(cfg)}
        step, root = steps[label], Path(work)
        stage_of = {s.label: s.stage for s in steps.values()}
        paths = {}
        for name, src in step.inputs.items():
            if src is None:
                paths[name] = None
            elif src == "base":
                paths[name] = base_folder(cfg.model, cfg.artifact_root)
            else:
                paths[name] = dag.artifact_path(stage_of[src], _folder(root, src))
        out = _folder(root, label)
        output = dag.STAGES[step.stage].output
        if output:
            out.mkdir(parents=True)
            out = out / output
        dag.run_step(step, cfg, paths, out)
    queue.put({"stage": label, "wall_s": time.perf_counter() - t0, "import_s": t0 - t_import,
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def labels(cfg, evaluations: bool = True) -> list[str]:
    """'imports', then every step of the cell's DAG but the report (optionally without the evaluations)."""
    from nlsr import dag
    return ["imports"] + [s.label for s in dag.steps(cfg)
                          if s.stage != "report" and (evaluations or s.stage != "evaluate")]


def run(cfg, work: Path, evaluations: bool = True) -> list[dict]:
    from nlsr.modeling import base_folder
    base_folder(cfg.model, cfg.artifact_root)  # built once, outside the timings (as the flow's 'base' task)
    ctx = mp.get_context("spawn")
    rows = []
    for label in labels(cfg, evaluations):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(label, cfg.model_dump_json(), str(work), queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"step {label} failed (exit code {proc.exitcode})")
        rows.append(queue.get())
        print(f"  {label}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
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
    ap.add_argument("--no-evaluations", action="store_true", help="skip the evaluate steps (one per variant)")
    args, _ = ap.parse_known_args(argv)
    from nlsr.config import load_config
    path = args.config or ROOT / "configs" / ("smoke.yaml" if args.quick else "default.yaml")
    extra = [f"artifact_root={args.artifact_root}"] if args.artifact_root else []
    cfg = load_config(path, [*args.overrides, *extra])
    with tempfile.TemporaryDirectory(prefix="nlsr-bench-stages-") as work:
        rows = run(cfg, Path(work), evaluations=not args.no_evaluations)
    print(f"pipeline stages, config {Path(path).name} ({cfg.model.source} model, device {cfg.model.device})")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
