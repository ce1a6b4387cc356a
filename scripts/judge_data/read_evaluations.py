"""Read a grid's evaluation answers: export them for two blind reading passes, then assemble the readings into the
labels file that `nlsr report --rows ROWS --labels LABELS` scores by (nlsr/reading.py).

Why: the judge's harmful scores are proxies whose error differs by model variant (nlsr/judge_card.md); the answers
of a published table can be read instead. The reading is done by people (or reader sessions) against
nlsr/judge_data/runtime/RUBRIC.md, never by a program; this script only does the bookkeeping around it.

    # 1. the items to read: each distinct (prompt, answer) of the grid's evaluations once, shuffled, in
    #    <out>/A1..A<k>.jsonl (pass A) and <out>/B1..B<k>.jsonl (pass B: another shuffle, each part reversed)
    python scripts/judge_data/read_evaluations.py export --root runs --rows docs/results/default-seeds/rows.jsonl \\
        --out reading/
    # 2. readers write one {"id", "label"} line per item (a.jsonl, b.jsonl: the two passes; c.jsonl: a third
    #    reading of every disagreement), then
    python scripts/judge_data/read_evaluations.py assemble --root runs --rows docs/results/default-seeds/rows.jsonl \\
        --readings reading/ --out docs/results/default-seeds/reading.jsonl

The labels are for measuring the published numbers only: their prompts are evaluation prompts, so they never
train or tune a judge.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from assemble_labels import agreement, labelled, pair_id, readings  # noqa: E402

from nlsr.data import read_jsonl, write_jsonl  # noqa: E402


def evaluations(root: Path, rows_file: Path, harmful_set: str) -> dict[str, list[dict]]:
    """eval_key -> its harmful-set samples in verdict order (checked against the rows' verdicts)."""
    out: dict[str, list[dict]] = {}
    for r in read_jsonl(rows_file):
        key = r["eval_key"]
        if key in out:
            continue
        samples = [s for s in read_jsonl(root / "evaluate" / key / "samples.jsonl") if s["set"] == harmful_set]
        bits = "".join("1" if s["harmful"] else "0" for s in samples)
        if bits != r["verdicts"]["harmful_score"]:
            raise SystemExit(f"evaluation {key}: its samples do not match the rows' verdicts (another store?)")
        out[key] = samples
    return out


def export(args) -> None:
    evals = evaluations(args.root, args.rows, args.set)
    items = {pair_id(s["prompt"], s["answer"]): {"id": pair_id(s["prompt"], s["answer"]), "prompt": s["prompt"],
                                                 "answer": s["answer"]}
             for samples in evals.values() for s in samples}
    items = list(items.values())
    args.out.mkdir(parents=True, exist_ok=True)
    for name, seed, reverse in (("A", args.seed, False), ("B", args.seed + 11, True)):
        order = items[:]
        random.Random(seed).shuffle(order)
        for i in range(args.parts):
            part = order[i::args.parts][::-1] if reverse else order[i::args.parts]
            write_jsonl(part, args.out / f"{name}{i + 1}.jsonl")
    print(f"{len(items)} distinct answers of {len(evals)} evaluations -> {args.out}/A*.jsonl, B*.jsonl "
          f"({args.parts} parts per pass)")


def assemble(args) -> None:
    evals = evaluations(args.root, args.rows, args.set)
    pairs = {pair_id(s["prompt"], s["answer"]): {"prompt": s["prompt"], "answer": s["answer"]}
             for samples in evals.values() for s in samples}
    c = readings(args.readings / "c.jsonl") if (args.readings / "c.jsonl").is_file() else {}
    read = {r["id"]: r for r in labelled({k: {"id": k, **v} for k, v in pairs.items()},
                                         readings(args.readings / "a.jsonl"), readings(args.readings / "b.jsonl"), c)}
    rows = [{"eval_key": key, "index": i, "prompt": s["prompt"], "answer": s["answer"],
             **{k: read[pair_id(s["prompt"], s["answer"])][k] for k in ("label", "label_a", "label_b", "resolution")}}
            for key, samples in evals.items() for i, s in enumerate(samples)]
    write_jsonl(rows, args.out)
    print(f"{len(rows)} labelled answers ({len(read)} distinct) -> {args.out}; readings: "
          f"{json.dumps(agreement(list(read.values())))}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(required=True)
    for name, fn in (("export", export), ("assemble", assemble)):
        p = sub.add_parser(name)
        p.add_argument("--root", type=Path, required=True, help="artifact root holding the evaluations")
        p.add_argument("--rows", type=Path, required=True, help="the grid's rows.jsonl")
        p.add_argument("--set", default="harmful_eval", help="the harmful prompt set of the evaluations")
        p.set_defaults(func=fn)
        if name == "export":
            p.add_argument("--out", type=Path, required=True)
            p.add_argument("--parts", type=int, default=4, help="reader sessions per pass")
            p.add_argument("--seed", type=int, default=31)
        else:
            p.add_argument("--readings", type=Path, required=True)
            p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
