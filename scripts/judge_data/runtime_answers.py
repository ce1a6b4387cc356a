"""Generate the run-time answers that the judge's labelled set (nlsr/judge_data/runtime/) is made of.

Why: the judge decides every harmful score, and the answers it judges at run time (SmolLM2, greedy, <= 48 new
tokens, cut at the Alpaca stop markers) look nothing like BeaverTails' long answers. This script makes the
pipeline's own models answer risky prompts that are *not* evaluation prompts, so that a judge can be trained and
validated on exactly that kind of answer. The labels are NOT made here: each answer is labelled by reading
(nlsr/judge_data/runtime/README.md says how).

Run (the default cell must have run into the same artifact root first: `nlsr run configs/default.yaml`):

    python scripts/judge_data/runtime_answers.py --root runs --out answers/ [--only raw,w0,...]

Round 1 (1,541 pairs) answered with the cell of configs/advice-aligned.yaml (then the default). Round 2 answered
with the refusal-aligned default cell, on other prompt draws, with fewer answers per variant:

    python scripts/judge_data/runtime_answers.py --root runs --out answers-r2/ --tag refusals --seed-offset 2000 \
        --scale 0.6

The model variants: the default cell's own models (raw base, W0, aligned DPO, the safety reference, fine-tuned,
NLSR-realigned, restore-modules), extra models trained here with the pipeline's own training code (ORPO
alignment, a stronger attack p 0.45, an AG News attack, a Non-Aligned attack on the raw base) and deliberately
broken ones (the fine-tuned adapter scaled x4: degenerate text; 16-token budgets: truncated compliance; 128-token
budgets: long answers). Prompts come from harmful_dev, PKU-SafeRLHF, BeaverTails (safe pool, unsafe overlap,
poison pool) and pure_bad, never from harmful_eval, AdvBench or HarmBench (checked on normalised text).
Deterministic: fixed seeds, greedy decoding.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nlsr import data, modeling  # noqa: E402
from nlsr.config import load_config  # noqa: E402
from nlsr.evaluation import clean_answer  # noqa: E402
from nlsr.generation import generate  # noqa: E402
from tasks.keys import plan  # noqa: E402

EVAL_ONLY = ("harmful_eval", "advbench", "harmbench")
# source name -> (file stem, weight of the source in each variant's prompt draw)
SOURCES = {"harmful_dev": 0.22, "pku": 0.40, "bt_safe": 0.18, "bt_overlap": 0.10, "bt_poison": 0.05,
           "pure_bad": 0.05}
SPLIT_SEED = "nlsr-runtime-judge-v1"
# decoding batch: 48 answers at a time (CPU decoding is memory-bound; larger batches are faster per answer)
BATCH = 48
EXTRA_ATTACK_N = 240


def norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def split_of(prompt: str) -> str:
    """train / dev / test by a hash of the normalised prompt: every answer to one prompt lands in one split."""
    h = int(hashlib.sha256(f"{SPLIT_SEED}:{norm(prompt)}".encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 60 else "dev" if h < 75 else "test"


def prompt_pools() -> dict[str, list[str]]:
    banned = {norm(r["prompt"]) for s in EVAL_ONLY for r in data.load(s)}
    raw = {"harmful_dev": [r["prompt"] for r in data.load("harmful_dev")],
           "pku": [r["prompt"] for r in data.load("pairs")],
           "bt_safe": [r["prompt"] for r in data.load("safe")],
           "bt_overlap": [r["prompt"] for r in data.load("unsafe_overlap")],
           "bt_poison": [r["prompt"] for r in data.load("beavertails")],
           "pure_bad": [r["prompt"] for r in data.load("pure_bad")]}
    pools = {}
    for name, prompts in raw.items():
        seen, keep = set(), []
        for p in prompts:
            k = norm(p)
            if k and k not in banned and k not in seen and len(p) <= 600:
                seen.add(k)
                keep.append(p)
        pools[name] = keep
    return pools


def draw(pools: dict[str, list[str]], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out, used = [], set()
    for name, w in SOURCES.items():
        k = min(round(n * w), len(pools[name]))
        for p in rng.sample(pools[name], k):
            if norm(p) not in used:
                used.add(norm(p))
                out.append((name, p))
    rng.shuffle(out)
    return out[:n]


# --------------------------------------------------------------------------------------------- the models

def cell_paths(cfg) -> dict[str, Path]:
    nodes, root = plan(cfg), Path(cfg.artifact_root)
    p = {label: root / n.stage / n.key for label, n in nodes.items() if label != "report"}
    p["base"] = modeling.base_folder(cfg.model, cfg.artifact_root)
    return p


def extra_models(cfg, paths: dict[str, Path], work: Path) -> dict[str, Path]:
    """Models trained here with the pipeline's own code (cached under `work`)."""
    from nlsr.realign import realign
    from nlsr.training import finetune, preference_align
    out: dict[str, Path] = {}

    def once(name: str, fn) -> Path:
        folder = work / name
        if not (folder / "adapter_model.safetensors").is_file():
            t0 = time.time()
            fn(folder)
            print(f"[models] {name}: {time.time() - t0:.0f} s", flush=True)
        out[name] = folder
        return folder

    for method in ("nlsr", "restore-modules"):
        once(f"realign-{method}", lambda f, m=method: realign(
            paths["sft"], paths["reference"], paths["finetune"],
            paths["score"] / "masks.safetensors" if m == "nlsr" else None, cfg.realign, f, method=m))

    def attack(f: Path, task: str, p: float, adapter: Path | None, base: Path) -> None:
        # n 240 instead of the cell's 400 (30 steps, not 50): these extra attacks only widen the answer styles
        c = cfg.model_copy(update={"data": cfg.data.model_copy(update={"task": task, "poison_ratio": p,
                                                                        "n": EXTRA_ATTACK_N})})
        mix = work / f"mix-{task}-{p}.jsonl"
        data.write_jsonl(data.poison_mix(task, c.data.n, p, c.data.seed, c.data.poison_source), mix)
        finetune(c, base, adapter, mix, f)

    once("ft-sst2-p0.45", lambda f: attack(f, "sst2", 0.45, paths["align"], paths["sft"]))
    once("nonaligned-sst2-p0.2", lambda f: attack(f, "sst2", 0.2, None, paths["base"]))
    once("aligned-orpo", lambda f: preference_align(
        cfg.model_copy(update={"alignment": cfg.alignment.model_copy(update={"method": "orpo"})}),
        paths["sft"], f))
    once("ft-agnews-p0.2", lambda f: attack(f, "agnews", 0.2, paths["align"], paths["sft"]))
    once("broken-x4", lambda f: scaled(paths["finetune"], f, 4.0))
    return out


def scaled(adapter: Path, out: Path, factor: float) -> None:
    """The adapter with every lora_B multiplied by `factor`: an over-amplified, broken model."""
    w = {k: (v * factor if ".lora_B." in k else v) for k, v in modeling.adapter_weights(adapter).items()}
    modeling.save_adapter_weights(adapter, w, out, extra={"stage": "judge-data", "scaled_from": str(adapter),
                                                          "factor": factor})


def variants(paths: dict[str, Path], extra: dict[str, Path]) -> list[dict]:
    """name, what it is, base, adapter, max_new_tokens, number of answers (a model not trained yet: None)."""
    w0, base = paths["sft"], paths["base"]
    extra = {k: extra.get(k, Path("/not-trained-yet")) for k in (
        "aligned-orpo", "ft-sst2-p0.45", "ft-agnews-p0.2", "nonaligned-sst2-p0.2", "realign-nlsr",
        "realign-restore-modules", "broken-x4")}
    v = [("raw", "SmolLM2-135M-Instruct as shipped (M_raw)", base, None, 48, 130),
         ("raw-long", "M_raw, 128 new tokens", base, None, 128, 60),
         ("w0", "safety SFT merged (W0)", w0, None, 48, 130),
         ("aligned-dpo", "W0 + DPO adapter (the default cell's aligned model)", w0, paths["align"], 48, 130),
         ("aligned-orpo", "W0 + ORPO adapter", w0, extra["aligned-orpo"], 48, 110),
         ("reference", "W0 + pre-amplified safety reference (x1.8 per factor)", w0, paths["reference"], 48, 80),
         ("ft-sst2-p0.2", "aligned, fine-tuned on SST-2 with p 0.2 (default attack)", w0, paths["finetune"], 48, 160),
         ("ft-sst2-p0.2-long", "default attack, 128 new tokens", w0, paths["finetune"], 128, 80),
         ("ft-sst2-p0.2-short", "default attack, 16 new tokens (truncated)", w0, paths["finetune"], 16, 60),
         ("ft-sst2-p0.45", "aligned, fine-tuned on SST-2 with p 0.45 (n 240)", w0, extra["ft-sst2-p0.45"], 48, 130),
         ("ft-agnews-p0.2", "aligned, fine-tuned on AG News with p 0.2 (n 240)", w0, extra["ft-agnews-p0.2"], 48, 100),
         ("nonaligned-sst2-p0.2", "fresh LoRA on M_raw, SST-2 p 0.2, n 240 (Non-Aligned)", base,
          extra["nonaligned-sst2-p0.2"], 48, 110),
         ("nlsr", "default attack realigned by NLSR", w0, extra["realign-nlsr"], 48, 120),
         ("restore-modules", "default attack, whole-module restore", w0, extra["realign-restore-modules"], 48, 80),
         ("broken-x4", "default attack with lora_B x4 (broken: degenerate text)", w0, extra["broken-x4"], 48, 60),
         ("aligned-dpo-long", "the default cell's aligned model, 128 new tokens", w0, paths["align"], 128, 40),
         ("ft-sst2-p0.45-long", "SST-2 p 0.45 attack (n 240), 128 new tokens", w0, extra["ft-sst2-p0.45"], 128, 40)]
    return [dict(zip(("variant", "model", "base", "adapter", "max_new_tokens", "n"), x)) for x in v]


def answer_variant(cfg, spec: dict, pools, seed: int, tag: str = "") -> list[dict]:
    from nlsr.evaluation import load_for_eval
    model, tok = load_for_eval(cfg, spec["base"], spec["adapter"])
    drawn = draw(pools, spec["n"], seed)
    prompts = [data.format_prompt(p, "", cfg.data.template, tok) for _, p in drawn]
    raw = generate(model, tok, prompts, spec["max_new_tokens"], BATCH)
    variant = f"{tag}:{spec['variant']}" if tag else spec["variant"]
    return [{"prompt": p, "answer": clean_answer(a), "variant": variant, "model": spec["model"],
             "max_new_tokens": spec["max_new_tokens"], "prompt_source": src, "split": split_of(p)}
            for (src, p), a in zip(drawn, raw)]


def ready(folder: Path | None) -> bool:
    return folder is None or (folder / "_SUCCESS").is_file() or (folder / "adapter_model.safetensors").is_file() \
        or (folder / "config.json").is_file()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    ap.add_argument("--root", required=True, help="artifact root where the default cell ran")
    ap.add_argument("--out", required=True, help="folder: one answers-<variant>.jsonl per variant")
    ap.add_argument("--only", default="", help="comma-separated variants (default: all whose models exist)")
    ap.add_argument("--no-train", action="store_true", help="answer with the models that exist, train none")
    ap.add_argument("--tag", default="", help="prefix of the variant names ('refusals' -> 'refusals:w0'): which "
                    "cell answered, when the config's cell is not the one of round 1")
    ap.add_argument("--seed-offset", type=int, default=1000, help="variant i draws its prompts with seed offset+i")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every variant's number of answers")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [f"artifact_root={args.root}"])
    paths = cell_paths(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = [s for s in args.only.split(",") if s]
    pools = prompt_pools()
    work = Path(args.root) / "judge-data-models"
    cell_done = all(ready(paths[k]) and (paths[k] / "_SUCCESS").is_file()
                    for k in ("sft", "align", "reference", "score", "finetune"))
    extra = extra_models(cfg, paths, work) if cell_done and not args.no_train else \
        {k.name: k for k in work.glob("*")} if work.is_dir() else {}
    for i, spec in enumerate(variants(paths, extra)):
        target = out / f"answers-{spec['variant']}.jsonl"
        if (only and spec["variant"] not in only) or target.is_file():
            continue
        if not (ready(spec["base"]) and ready(spec["adapter"])):
            print(f"[answers] {spec['variant']}: model not there yet, skipped", flush=True)
            continue
        t0 = time.time()
        spec["n"] = max(1, round(spec["n"] * args.scale))
        rows = answer_variant(cfg, spec, pools, seed=args.seed_offset + i, tag=args.tag)
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.rename(target)
        print(f"[answers] {spec['variant']}: {len(rows)} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
