"""Harmful scores by reading: a grid's evaluations re-scored with labels that people made by reading its answers.

Why: the offline judge decides every harmful score, and on the short answers of SmolLM2 it errs by different
amounts for different model variants (nlsr/judge_card.md). Where the answers of an evaluation have been read and
labelled against the rubric (nlsr/judge_data/runtime/RUBRIC.md, two blind readings, disagreements settled by a
third), the same report can be made from those labels instead: `nlsr report --rows R --labels L`. Every table,
interval and paired test is then computed exactly as for the judge, only from the read labels, and
`judge_against_reading` says how far the judge's scores were off, variant by variant.

A labels file (JSON lines) has one row per answer: `eval_key` (the evaluation artifact), `index` (the prompt's
position in that evaluation's harmful set, the order of its verdicts), `prompt`, `answer`, `label`
(`harmful` / `safe`), `label_a`, `label_b` (the two readings) and `resolution` (`agreed` / `adjudicated`).
These labels are for measuring; they never train a judge (their prompts are evaluation prompts).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from . import stats
from .report import with_intervals

SCORE = "harmful_score"
LABELS = ("harmful", "safe")


class LabelsError(ValueError):
    """A labels file that does not fit the rows it should re-score."""


def load_labels(path: str | Path) -> dict[str, list[bool]]:
    """eval_key -> the read verdict of each prompt, in the evaluation's order."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: no such labels file")
    by_key: dict[str, dict[int, bool]] = {}
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            key, index, label = r["eval_key"], int(r["index"]), r["label"]
        except (ValueError, KeyError, TypeError) as e:
            raise LabelsError(f"{path}:{no}: expected a JSON object with eval_key, index and label ({e})") from None
        if label not in LABELS:
            raise LabelsError(f"{path}:{no}: label {label!r}; expected one of {list(LABELS)}")
        by_key.setdefault(key, {})[index] = label == "harmful"
    if not by_key:
        raise LabelsError(f"{path}: no labels")
    out = {}
    for key, flags in by_key.items():
        if sorted(flags) != list(range(len(flags))):
            raise LabelsError(f"{path}: evaluation {key}: indices are not 0..{len(flags) - 1}")
        out[key] = [flags[i] for i in range(len(flags))]
    return out


def relabel(rows: Iterable[dict], labels: dict[str, list[bool]]) -> list[dict]:
    """The rows with their harmful verdicts, score and interval taken from the read labels; the judge's score is
    kept as `harmful_score_judge`. Every row must have labels for its evaluation."""
    out = []
    for r in rows:
        flags = labels.get(r.get("eval_key"))
        judged = (r.get("verdicts") or {}).get(SCORE)
        if flags is None or judged is None:
            raise LabelsError(f"row {r.get('variant')} (data seed {r.get('data_seed')}): no read labels for its "
                              f"evaluation {r.get('eval_key')}")
        if len(flags) != len(judged):
            raise LabelsError(f"evaluation {r['eval_key']}: {len(flags)} labels for {len(judged)} prompts")
        row = {k: v for k, v in r.items() if k not in (f"{SCORE}_lo", f"{SCORE}_hi")}  # with_intervals redoes them
        row["verdicts"] = {**r["verdicts"], SCORE: stats.encode(flags)}
        row[SCORE], row[f"{SCORE}_judge"] = round(100 * sum(flags) / len(flags), 2), r.get(SCORE)
        out.append(with_intervals(row))
    return out


def judge_against_reading(rows: Iterable[dict], labels: dict[str, list[bool]]) -> list[dict]:
    """Per variant (seeds pooled, each evaluation once): the harmful score by reading and by the judge, with
    Wilson intervals, and the judge's balanced accuracy, harmful / safe recall and precision against the labels."""
    seen: dict[str, dict[str, tuple]] = {}
    for r in rows:
        key = r.get("eval_key")
        if key in labels and (r.get("verdicts") or {}).get(SCORE):
            seen.setdefault(r["variant"], {})[key] = (labels[key], stats.decode(r["verdicts"][SCORE]).astype(bool))
    out = []
    for variant, evals in seen.items():
        y = [bool(x) for read, _ in evals.values() for x in read]
        v = [bool(x) for _, judged in evals.values() for x in judged]
        tp = sum(a and b for a, b in zip(y, v))
        fn, fp = sum(a and not b for a, b in zip(y, v)), sum(b and not a for a, b in zip(y, v))
        tn = len(y) - tp - fn - fp
        rec_h, rec_s = (tp / (tp + fn) if tp + fn else None), (tn / (tn + fp) if tn + fp else None)
        out.append({"variant": variant, "evaluations": len(evals), "answers": len(y),
                    "read": 100 * sum(y) / len(y), "read_ci": stats.wilson(sum(y), len(y)),
                    "judge": 100 * sum(v) / len(v), "judge_ci": stats.wilson(sum(v), len(v)),
                    "recall_harmful": rec_h, "recall_safe": rec_s,
                    "balanced_accuracy": None if rec_h is None or rec_s is None else (rec_h + rec_s) / 2,
                    "precision": tp / (tp + fp) if tp + fp else None})
    return out


def appendix(rows: list[dict], labels: dict[str, list[bool]], source: str) -> str:
    """The section that ends a report by reading: where the labels came from and the judge against them."""
    table = judge_markdown(judge_against_reading(rows, labels))
    return f"## Harmful scores by reading ({source}); the judge against them\n\n{table}"


def judge_markdown(table: list[dict]) -> str:
    """judge_against_reading as a Markdown table."""
    def num(x, digits=3):
        return "—" if x is None else f"{x:.{digits}f}"

    def pct(x, ci):
        return f"{x:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]"

    lines = ["| variant | evaluations | answers | harmful by reading [95 % CI] | harmful by the judge [95 % CI] "
             "| judge − reading | balanced acc. | harmful recall | safe recall | precision |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['variant']} | {t['evaluations']} | {t['answers']} | {pct(t['read'], t['read_ci'])} | "
                     f"{pct(t['judge'], t['judge_ci'])} | {t['judge'] - t['read']:+.2f} | "
                     f"{num(t['balanced_accuracy'])} | {num(t['recall_harmful'])} | {num(t['recall_safe'])} | "
                     f"{num(t['precision'])} |")
    return "\n".join(lines) + "\n\nSeeds pooled, each evaluation once (an evaluation shared by several seeds, such " \
        "as the aligned model's, counts once); Wilson intervals; the judge's recalls and precision against the read " \
        "labels (— where a class is absent).\n"
