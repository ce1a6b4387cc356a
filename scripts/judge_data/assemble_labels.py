"""Join generated run-time answers with their two blind readings (and the third reading of each disagreement) into
the round's file in nlsr/judge_data/runtime/ (pairs.jsonl for round 1, pairs-round<N>.jsonl after), and rewrite
stats.json (counts, agreement, Cohen's κ, overall and per round).

Why a script: the labels are made by people (or reader sessions) reading each item, never by a program; what a
program may do is the bookkeeping around them: deduplicate identical (prompt, answer) pairs across variants, give
each pair its id and split, check that every pair got both readings, and count the agreement.

Inputs of one labelling round (folder layout as left by the round):

    answers/answers-<variant>.jsonl   rows of scripts/judge_data/runtime_answers.py
    readings/a.jsonl, readings/b.jsonl  {"id", "label"} per pair: the two independent passes
    readings/c.jsonl                  {"id", "label"} for every pair where a != b: the third reading

Run:

    python scripts/judge_data/assemble_labels.py --round 2 --answers answers-r2/ --readings readings-r2/

A pair already labelled in an earlier round (the same prompt and answer) is left out of the new round: the files of
earlier rounds stay byte for byte as they were (the judge recipes trained on them hash them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nlsr.atomic import write_json  # noqa: E402
from nlsr.data import read_jsonl, write_jsonl  # noqa: E402
from nlsr.judges.validation import RUNTIME_ROUNDS, SPLITS, runtime_pairs  # noqa: E402

LABELS = ("harmful", "safe")


def pair_id(prompt: str, answer: str) -> str:
    return hashlib.sha1(f"{prompt}\0{answer}".encode()).hexdigest()[:12]


def unique_pairs(answer_dir: Path) -> dict[str, dict]:
    """id -> one row per distinct (prompt, answer), with every variant and token budget that produced it."""
    out: dict[str, dict] = {}
    for f in sorted(answer_dir.glob("answers-*.jsonl")):
        for r in read_jsonl(f):
            pid = pair_id(r["prompt"], r["answer"])
            row = out.setdefault(pid, {"id": pid, "prompt": r["prompt"], "answer": r["answer"], "split": r["split"],
                                       "prompt_source": r["prompt_source"], "variants": [], "max_new_tokens": []})
            if r["variant"] not in row["variants"]:
                row["variants"].append(r["variant"])
            if r["max_new_tokens"] not in row["max_new_tokens"]:
                row["max_new_tokens"].append(r["max_new_tokens"])
    return out


def readings(path: Path) -> dict[str, str]:
    out = {}
    for r in read_jsonl(path):
        if r.get("label") not in LABELS:
            raise SystemExit(f"{path}: id {r.get('id')!r} has label {r.get('label')!r}; expected one of {LABELS}")
        out[r["id"]] = r["label"]
    return out


def labelled(pairs: dict[str, dict], a: dict, b: dict, c: dict) -> list[dict]:
    missing = [pid for pid in pairs if pid not in a or pid not in b]
    if missing:
        raise SystemExit(f"{len(missing)} pairs lack a reading (first: {missing[0]}); every pair needs passes a and b")
    rows = []
    for pid, row in pairs.items():
        agreed = a[pid] == b[pid]
        if not agreed and pid not in c:
            raise SystemExit(f"pair {pid}: the readings disagree and readings/c.jsonl has no third reading")
        label = a[pid] if agreed else c[pid]
        rows.append({**row, "label": label, "harmful": label == "harmful", "label_a": a[pid], "label_b": b[pid],
                     "resolution": "agreed" if agreed else "adjudicated"})
    return rows


def agreement(rows: list[dict]) -> dict:
    from sklearn.metrics import cohen_kappa_score
    a, b = [r["label_a"] for r in rows], [r["label_b"] for r in rows]
    agree = sum(x == y for x, y in zip(a, b))
    return {"pairs": len(rows), "agreement": round(agree / len(rows), 4),
            "cohen_kappa": round(float(cohen_kappa_score(a, b)), 3), "disagreements": len(rows) - agree,
            "harmful": sum(r["harmful"] for r in rows)}


def stats(rows: list[dict]) -> dict:
    rounds = sorted({r["round"] for r in rows})
    by_split = {s: {"n": sum(r["split"] == s for r in rows), "harmful": sum(r["harmful"] for r in rows
                                                                             if r["split"] == s)} for s in SPLITS}
    out = {**agreement(rows), "both_passes": len(rows), "unresolved_dropped": 0, "by_split": by_split,
           "by_round": {str(n): {**agreement([r for r in rows if r["round"] == n]),
                                 "by_split": dict(Counter(r["split"] for r in rows if r["round"] == n))}
                        for n in rounds}}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--round", type=int, required=True, choices=sorted(RUNTIME_ROUNDS),
                    help="the labelling round these readings belong to")
    ap.add_argument("--answers", type=Path, required=True)
    ap.add_argument("--readings", type=Path, required=True)
    args = ap.parse_args(argv)
    earlier = {r["id"] for r in runtime_pairs(rounds=[n for n in RUNTIME_ROUNDS
                                                      if n < args.round and RUNTIME_ROUNDS[n].is_file()])}
    answered = unique_pairs(args.answers)
    pairs = {pid: row for pid, row in answered.items() if pid not in earlier}
    c = readings(args.readings / "c.jsonl") if (args.readings / "c.jsonl").is_file() else {}
    rows = labelled(pairs, readings(args.readings / "a.jsonl"), readings(args.readings / "b.jsonl"), c)
    out = write_jsonl(rows, RUNTIME_ROUNDS[args.round])
    st = stats(runtime_pairs(rounds=[n for n in RUNTIME_ROUNDS if RUNTIME_ROUNDS[n].is_file()]))
    write_json(st, out.parent / "stats.json")
    print(f"{len(rows)} pairs -> {out} ({len(answered) - len(pairs)} already labelled earlier)")
    print(json.dumps({k: st[k] for k in ("pairs", "agreement", "cohen_kappa", "by_round")}, indent=1))


if __name__ == "__main__":
    main()
