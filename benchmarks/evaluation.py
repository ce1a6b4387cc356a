"""Speed of the evaluation's generation: decoding to max_new_tokens (before) vs stopping each row at the Alpaca
turn markers (after), on the same prompts; the cleaned answers must be identical.

    python -m benchmarks.evaluation                     # embedded SmolLM2, 32 harmful_dev prompts, ~2-4 min on 2 cores
    python -m benchmarks.evaluation --quick             # the tiny random model (it never writes a marker)
    python -m benchmarks.evaluation --n 64 --batch-sizes 16,8

answers/s is what an evaluation's wall time follows; tokens/s counts the tokens of the cleaned answers (the same in
every row of the table when the answers are identical, so it moves with answers/s). 'rows computed' counts the
rows of every forward pass (prefill + one per decoded token, finished rows included): unlike the times, it does not
depend on what else the machine is doing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _answers(model, tok, prompts: list[str], budget: int, batch: int, stop: bool) -> dict:
    """Cleaned answers, wall and CPU seconds, and the rows the model computed (a forward pass over a batch of b
    rows counts b): that count does not depend on what else runs on the machine."""
    from nlsr.evaluation import STOP_MARKERS, clean_answer
    from nlsr.generation import generate
    rows = [0]
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.__setitem__(0, rows[0] + kwargs["input_ids"].shape[0]), with_kwargs=True)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        raw = generate(model, tok, prompts, budget, batch, stop_strings=STOP_MARKERS if stop else ())
    finally:
        hook.remove()
    return {"answers": [clean_answer(a) for a in raw], "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "row_steps": rows[0]}


def run(cfg, n: int, batch_sizes: list[int], prompt_set: str) -> list[dict]:
    from nlsr import data, modeling
    from nlsr.evaluation import load_for_eval
    base = modeling.base_folder(cfg.model, cfg.artifact_root)
    model, tok = load_for_eval(cfg, base, None)
    prompts = [data.format_prompt(r["prompt"], "", cfg.data.template, tok) for r in data.harmful_prompts(prompt_set, n)]
    budget = cfg.evaluation.max_new_tokens
    _answers(model, tok, prompts[:2], 4, 2, True)  # warm-up: first-call allocations, the stop-string tables
    before = _answers(model, tok, prompts, budget, cfg.evaluation.batch_size, False)
    rows = [{"setting": f"before: to max_new_tokens, batch {cfg.evaluation.batch_size}", **before,
             "identical": len(before["answers"])}]
    for b in batch_sizes:
        after = _answers(model, tok, prompts, budget, b, True)
        rows.append({"setting": f"after: stop at markers, batch {b}", **after,
                     "identical": sum(x == y for x, y in zip(after["answers"], before["answers"]))})
    for r in rows:
        r["tokens"] = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in r["answers"])
    return rows


def table(rows: list[dict], n: int) -> str:
    base = rows[0]
    lines = ["| setting | wall s | CPU s | answers/s (wall) | tokens/s (wall) | speed-up (wall) | rows computed | "
             "fewer rows | identical answers |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {n / r['wall_s']:.2f} | "
              f"{r['tokens'] / r['wall_s']:.1f} | {base['wall_s'] / r['wall_s']:.2f}x | {r['row_steps']} | "
              f"{base['row_steps'] / r['row_steps']:.2f}x | {r['identical']}/{n} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="experiment YAML (default: configs/default.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="configs/smoke.yaml (tiny random model)")
    ap.add_argument("--n", type=int, default=32, help="harmful prompts (default 32)")
    ap.add_argument("--prompt-set", default="harmful_dev", help="shipped harmful prompt set (default harmful_dev)")
    ap.add_argument("--batch-sizes", default="16,32", help="batch sizes to try with stopping (default: 16,32)")
    ap.add_argument("--artifact-root", default=None, help="where base models are cached (default: runs)")
    args, _ = ap.parse_known_args(argv)
    from nlsr.config import load_config
    from nlsr.env import offline_defaults
    offline_defaults()
    path = args.config or ROOT / "configs" / ("smoke.yaml" if args.quick else "default.yaml")
    extra = [f"artifact_root={args.artifact_root}"] if args.artifact_root else []
    cfg = load_config(path, [*args.overrides, *extra])
    rows = run(cfg, args.n, [int(b) for b in args.batch_sizes.split(",")], args.prompt_set)
    print(f"evaluation generation, config {Path(path).name} ({cfg.model.source} model, device {cfg.model.device}), "
          f"{args.n} {args.prompt_set} prompts, ≤ {cfg.evaluation.max_new_tokens} new tokens")
    print(table(rows, args.n))
    return 0 if all(r["identical"] == args.n for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
