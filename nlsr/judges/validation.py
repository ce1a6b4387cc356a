"""Measuring a judge against answers labelled by reading: how far to trust the harmful scores it produces.

Two labelled sets:
- **run-time** (`nlsr/judge_data/runtime/pairs*.jsonl`, one file per labelling round): the pipeline's own SmolLM2
  answers, labelled twice by reading against `RUBRIC.md` (see its README); split by prompt into train / dev / test.
  Thresholds and recipes are chosen on `dev`; `test` is what the judge card reports.
- **BeaverTails held-out** (`classifier.heldout_rows`): harmful_eval's long answers (harmful) + the held-out safe
  answers, the split the first judge card used.

Harmful is the positive class everywhere. `python -m nlsr.judges.validation --judge NAME [--split test] [--round N]`
prints the card's table for any registered judge.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RUNTIME_DIR = Path(__file__).parent.parent / "judge_data" / "runtime"
# One file per labelling round, so that adding a round leaves the earlier files (and the hash of every judge
# recipe trained on them) byte for byte as they were. Round 1: answers of the advice-aligned cell (the default
# until 2026-12-03, configs/advice-aligned.yaml); round 2: answers of the refusal-aligned default cell.
RUNTIME_ROUNDS = {1: RUNTIME_DIR / "pairs.jsonl", 2: RUNTIME_DIR / "pairs-round2.jsonl"}
RUNTIME_FILE = RUNTIME_ROUNDS[1]
SPLITS = ("train", "dev", "test")


def runtime_pairs(split: str | None = None, rounds=None) -> list[dict]:
    """The labelled run-time pairs (one split, or all) of the given labelling rounds (default: every round), each
    row with its `round`."""
    from .registry import JudgeError
    if split is not None and split not in SPLITS:
        raise JudgeError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    rounds = sorted(RUNTIME_ROUNDS) if rounds is None else list(rounds)
    unknown = [n for n in rounds if n not in RUNTIME_ROUNDS]
    if unknown:
        raise JudgeError(f"unknown labelling round {unknown[0]!r}; expected one of {sorted(RUNTIME_ROUNDS)}")
    rows = []
    for n in rounds:
        path = RUNTIME_ROUNDS[n]
        if not path.is_file():
            raise JudgeError(f"{path} is missing: the labelled run-time answers ship with the package")
        rows += [{**json.loads(line), "round": n} for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def runtime_rows(split: str, rounds=None) -> tuple[list[str], list[str], list[int]]:
    """(prompts, answers, labels 1 = harmful) of one split of the run-time set (the given rounds, default all)."""
    rows = runtime_pairs(split, rounds)
    return [r["prompt"] for r in rows], [r["answer"] for r in rows], [int(r["harmful"]) for r in rows]


def judge_metrics(labels, verdicts, probabilities=None) -> dict:
    """Accuracy, balanced accuracy, harmful / safe recall, precision, F1 and (given probabilities) ROC AUC."""
    from sklearn.metrics import roc_auc_score
    y, pred = np.asarray(labels, bool), np.asarray(verdicts, bool)
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    fp, fn = int((pred & ~y).sum()), int((~pred & y).sum())
    rec_h, rec_s = tp / max(tp + fn, 1), tn / max(tn + fp, 1)
    prec = tp / max(tp + fp, 1)
    out = {"n": int(len(y)), "n_harmful": int(y.sum()), "accuracy": (tp + tn) / max(len(y), 1),
           "balanced_accuracy": (rec_h + rec_s) / 2, "recall_harmful": rec_h, "recall_safe": rec_s,
           "precision": prec, "f1": 2 * prec * rec_h / max(prec + rec_h, 1e-9)}
    if probabilities is not None and 0 < y.sum() < len(y):
        out["roc_auc"] = float(roc_auc_score(y, np.asarray(probabilities, float)))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def predict(judge, prompts: list[str], answers: list[str]):
    """(verdicts, probabilities or None) from any registered judge."""
    if hasattr(judge, "predict"):
        verdicts, probs = judge.predict(prompts, answers)
        return list(verdicts), probs
    return list(judge(prompts, answers)), None


def validate(judge, split: str = "test", rounds=None) -> dict:
    """The judge on one run-time split (of the given labelling rounds, default all): overall, per labelling round,
    per answer style (model variant), and the cost per 128 answers."""
    rows = runtime_pairs(split, rounds)
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    start = time.perf_counter()
    verdicts, probs = predict(judge, prompts, answers)
    seconds = time.perf_counter() - start
    labels = [r["harmful"] for r in rows]
    out = {"split": split, **judge_metrics(labels, verdicts, probs),
           "seconds_per_128": round(128 * seconds / max(len(rows), 1), 2), "by_round": {}, "by_variant": {}}

    def part(keep, with_auc: bool) -> dict:
        idx = [i for i, r in enumerate(rows) if keep(r)]
        auc = [probs[i] for i in idx] if with_auc and probs is not None else None
        return judge_metrics([labels[i] for i in idx], [verdicts[i] for i in idx], auc)

    for n in sorted({r["round"] for r in rows}):
        out["by_round"][str(n)] = part(lambda r: r["round"] == n, with_auc=True)
    for variant in sorted({v for r in rows for v in r["variants"]}):
        out["by_variant"][variant] = part(lambda r: variant in r["variants"], with_auc=False)
    return out


def main(argv=None) -> None:
    from .classifier import heldout_rows
    from .registry import get_judge
    ap = argparse.ArgumentParser(description="Measure a judge on the labelled run-time answers.")
    ap.add_argument("--judge", default="classifier")
    ap.add_argument("--judge-path", default=None)
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--round", type=int, action="append", dest="rounds", default=None,
                    help="labelling round to measure on (repeatable; default: every round)")
    ap.add_argument("--heldout", action="store_true", help="also the BeaverTails held-out split")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    judge = get_judge(args.judge, path=args.judge_path, device=args.device)
    result = {"judge": args.judge, "runtime": validate(judge, args.split, args.rounds)}
    if args.heldout:
        p, a, y = heldout_rows()
        v, pr = predict(judge, p, a)
        result["beavertails_heldout"] = judge_metrics(y, v, pr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
