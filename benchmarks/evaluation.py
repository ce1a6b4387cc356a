"""Speed of the evaluation's generation on the same prompts: decoding to max_new_tokens with left padding (before),
stopping each row at the Alpaca turn markers, also computing the prompts' shared opening once, and also the lean
decoding of nlsr/generation.py (a preallocated KV cache; on the CPU, few-row products as (W @ x.T).T) (after);
the cleaned answers must be identical.

    python -m benchmarks.evaluation                     # embedded SmolLM2, 32 harmful_dev prompts, ~3-5 min on 2 cores
    python -m benchmarks.evaluation --quick             # the tiny random model (it never writes a marker)
    python -m benchmarks.evaluation --n 256 --prompt-set harmful_eval --adapter RUNS/finetune/KEY --batch-sizes 32

answers/s is what an evaluation's wall time follows; tokens/s counts the tokens of the cleaned answers (the same in
every row of the table when the answers are identical, so it moves with answers/s). 'positions computed' counts
what the model's forward passes computed (a pass over b rows of t tokens counts b × t: the prompts' prefill, then
one per row and decoded token, finished rows included): unlike the times, it does not depend on what else the
machine is doing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _answers(model, tok, prompts: list[str], budget: int, batch: int, stop: bool, share: bool, lean: bool) -> dict:
    """Cleaned answers, wall and CPU seconds, and the positions the model computed (a forward pass over b rows of
    t tokens counts b × t): that count does not depend on what else runs on the machine."""
    from nlsr.evaluation import STOP_MARKERS, clean_answer
    from nlsr.generation import generate
    positions = [0]
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: positions.__setitem__(0, positions[0] + kwargs["input_ids"].numel()),
        with_kwargs=True)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        raw = generate(model, tok, prompts, budget, batch, stop_strings=STOP_MARKERS if stop else (),
                       share_prefix=share, lean_decoding=lean)
    finally:
        hook.remove()
    return {"answers": [clean_answer(a) for a in raw], "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "positions": positions[0]}


def run(cfg, n: int, batch_sizes: list[int], prompt_set: str, adapter: Path | None = None) -> list[dict]:
    from nlsr import data, modeling
    from nlsr.evaluation import load_for_eval
    base = modeling.base_folder(cfg.model, cfg.artifact_root)
    model, tok = load_for_eval(cfg, base, adapter)
    prompts = [data.format_prompt(r["prompt"], "", cfg.data.template, tok) for r in data.harmful_prompts(prompt_set, n)]
    budget = cfg.evaluation.max_new_tokens
    _answers(model, tok, prompts[:2], 4, 2, True, True, True)  # warm-up: first allocations, the stop-string tables
    before = _answers(model, tok, prompts, budget, cfg.evaluation.batch_size, False, False, False)
    rows = [{"setting": f"before: to max_new_tokens, batch {cfg.evaluation.batch_size}", **before,
             "identical": len(before["answers"])}]
    for b in batch_sizes:
        for share, lean, name in ((False, False, "stop at markers"), (True, False, "stop at markers, shared prefix once"),
                                  (True, True, "stop, shared prefix, lean decoding")):
            after = _answers(model, tok, prompts, budget, b, True, share, lean)
            rows.append({"setting": f"after: {name}, batch {b}", **after,
                         "identical": sum(x == y for x, y in zip(after["answers"], before["answers"]))})
    for r in rows:
        r["tokens"] = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in r["answers"])
    return rows


def table(rows: list[dict], n: int) -> str:
    base = rows[0]
    lines = ["| setting | wall s | CPU s | answers/s (wall) | tokens/s (wall) | speed-up (wall) | positions computed | "
             "fewer positions | identical answers |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {n / r['wall_s']:.2f} | "
              f"{r['tokens'] / r['wall_s']:.1f} | {base['wall_s'] / r['wall_s']:.2f}x | {r['positions']} | "
              f"{base['positions'] / r['positions']:.2f}x | {r['identical']}/{n} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="experiment YAML (default: configs/default.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="configs/smoke.yaml (tiny random model)")
    ap.add_argument("--n", type=int, default=32, help="harmful prompts (default 32)")
    ap.add_argument("--prompt-set", default="harmful_dev", help="shipped harmful prompt set (default harmful_dev)")
    ap.add_argument("--batch-sizes", default="32", help="batch sizes to try the after settings at (default: 32)")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter folder to merge in (e.g. a fine-tuned model: "
                    "<artifact_root>/finetune/<key>); default: the base model")
    ap.add_argument("--artifact-root", default=None, help="where base models are cached (default: runs)")
    args, _ = ap.parse_known_args(argv)
    from nlsr.config import load_config
    from nlsr.env import offline_defaults
    offline_defaults()
    path = args.config or ROOT / "configs" / ("smoke.yaml" if args.quick else "default.yaml")
    extra = [f"artifact_root={args.artifact_root}"] if args.artifact_root else []
    cfg = load_config(path, [*args.overrides, *extra])
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        print(f"benchmarks.evaluation: --adapter {adapter}: expected a LoRA adapter folder (adapter_config.json)",
              file=sys.stderr)
        return 2
    rows = run(cfg, args.n, [int(b) for b in args.batch_sizes.split(",")], args.prompt_set, adapter)
    print(f"evaluation generation, config {Path(path).name} ({cfg.model.source} model, device {cfg.model.device}), "
          f"{args.n} {args.prompt_set} prompts, ≤ {cfg.evaluation.max_new_tokens} new tokens, "
          f"{'adapter ' + str(adapter) if adapter else 'the base model'}")
    print(table(rows, args.n))
    return 0 if all(r["identical"] == args.n for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
