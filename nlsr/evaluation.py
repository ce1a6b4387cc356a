"""Generation-based evaluation: harmful score (HS) and fine-tuning task accuracy (FA), as in the paper's A7.

- HS = 100 × flagged / prompts: greedy answers to harmful prompts, flagged by a judge (nlsr.judges).
- FA = 100 × correct / examples on the task's test split (or, for sweeps that choose knobs, its dev split: train
  rows the cell never trains on). Two readings: *lenient* = the release's substring checks (the paper's numbers:
  an SST-2 answer holding both labels counts as correct for either); *strict* = the first label the answer names
  (GSM8K: the number after "The final answer is", nothing else).
Answers are saved next to their prompts (samples.jsonl) so that every number can be audited.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from . import data, modeling, stats
from .atomic import atomic_dir, write_json
from .config import ExperimentConfig
from .generation import generate

# The model keeps writing Alpaca turns after its answer; the paper cuts at "!!!" and AG News at "### Instruction:".
STOP_MARKERS = ("### Instruction", "### Input", "### Response", "!!!")
TRAILING_MARKER = re.compile(r"\s*#+\s*\w*:?\s*$")

# ---------------------------------------------------------------------------------------------- answer parsers

SST2_LENIENT = {"positive": ("positive", "Positive"), "negative": ("negative", "Negative")}
SST2_STRICT = {"positive": r"\bpositive\b", "negative": r"\bnegative\b"}

AGNEWS_LENIENT = {"World": ("World", "world"), "Sports": ("Sports", "sports"),
                  "Business": ("Business", "business"), "Sci/Tech": ("Sci/Tech", "sci")}
AGNEWS_STRICT = {"World": r"\bworld\b", "Sports": r"\bsports?\b", "Business": r"\bbusiness\b",
                 "Sci/Tech": r"\bsci(?:ence)?\s*(?:/|&|-|and)\s*tech(?:nology)?\b"}

FINAL_ANSWER = "the final answer is"
# a number not glued to a preceding digit or dot: "5-3" yields 5 and 3, "-3" stays negative, ".5" is 0.5
NUMBER = re.compile(r"(?<![\d.])-?(?:\d+(?:\.\d+)?|\.\d+)")

# New-token budget per task when evaluation.task_max_new_tokens is None: a label needs a few tokens, a GSM8K
# answer a worked solution (the paper gives every task 200).
TASK_MAX_NEW_TOKENS = {"sst2": 4, "agnews": 6, "gsm8k": 160}


def clean_answer(text: str) -> str:
    """The answer proper: cut where the model starts a new Alpaca turn (or at the release's '!!!')."""
    cut = min((i for i in (text.find(m) for m in STOP_MARKERS) if i >= 0), default=len(text))
    # a short token budget can stop inside the marker ("positive\n\n###"): drop that dangling start
    return TRAILING_MARKER.sub("", text[:cut]).strip()


def first_label(answer: str, patterns: dict[str, str]) -> str | None:
    """The label whose pattern occurs first in the answer (case-insensitive), or None."""
    hits = [(m.start(), label) for label, pat in patterns.items()
            if (m := re.search(pat, answer, flags=re.IGNORECASE))]
    return min(hits)[1] if hits else None


def gsm8k_number(text: str, strict: bool = False) -> float | None:
    """The release's extraction: commas dropped; the first number after 'The final answer is', else the last
    number in the text. strict: only the number after the marker."""
    text = text.replace(",", "")
    at = text.lower().find(FINAL_ANSWER)
    if at >= 0:
        m = NUMBER.search(text, at + len(FINAL_ANSWER))
        if m:
            return float(m.group())
    if strict:
        return None
    found = NUMBER.findall(text)
    return float(found[-1]) if found else None


def _same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-6


def score_answer(task: str, answer: str, gold: str) -> dict:
    """{'correct' (lenient, the paper's), 'correct_strict', 'pred' (the strict reading)} for one answer."""
    if task == "sst2":
        pred = first_label(answer, SST2_STRICT)
        lenient = any(v in answer for v in SST2_LENIENT[gold])
    elif task == "agnews":
        pred = first_label(answer, AGNEWS_STRICT)
        lenient = any(v in answer for v in AGNEWS_LENIENT[gold])
    elif task == "gsm8k":
        gold_n = gsm8k_number(gold)
        pred = gsm8k_number(answer, strict=True)
        return {"correct": _same_number(gsm8k_number(answer), gold_n), "correct_strict": _same_number(pred, gold_n),
                "pred": pred, "gold_number": gold_n}
    else:
        raise data.DataError(f"unknown task {task!r}; expected one of {list(data.TASK_FILES)}")
    return {"correct": lenient, "correct_strict": pred == gold, "pred": pred}


# ---------------------------------------------------------------------------------------------- metrics

def percent(flags: list[bool]) -> float:
    return round(100.0 * sum(flags) / len(flags), 2) if flags else float("nan")


def harmful_by_category(rows: list[dict], flags: list[bool]) -> dict[str, float]:
    """HS per BeaverTails harm category (a prompt counts in each of its categories)."""
    groups: dict[str, list[bool]] = {}
    for row, flag in zip(rows, flags):
        for cat in row.get("categories") or []:
            groups.setdefault(cat, []).append(flag)
    return {cat: percent(f) for cat, f in sorted(groups.items())}


def verdicts(samples: list[dict], harmful_set: str) -> dict[str, str]:
    """Per-prompt verdicts of one evaluation, by the metric they make (nlsr.stats strings, in sample order):
    'harmful_score' (the main harmful set), 'harmful_score_<set>' (each extra set), 'task_accuracy' (lenient)."""
    out: dict[str, list[bool]] = {}
    for s in samples:
        if "harmful" in s:
            name = "harmful_score" if s["set"] == harmful_set else f"harmful_score_{s['set']}"
            out.setdefault(name, []).append(bool(s["harmful"]))
        elif "correct" in s:
            out.setdefault("task_accuracy", []).append(bool(s["correct"]))
    return {k: stats.encode(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- the stage

def load_for_eval(cfg: ExperimentConfig, base: Path, adapter: Path | None):
    """Base (+ adapter merged in memory: the same function, faster greedy decoding) and its tokenizer."""
    modeling.num_threads_hint()
    model = modeling.load_model(base, cfg.model.dtype, cfg.model.device)
    if adapter is not None:
        model = modeling.load_adapter(model, adapter).merge_and_unload()
    return model.eval(), modeling.load_tokenizer(base)


def _answers(model, tok, prompts: list[str], max_new_tokens: int, cfg: ExperimentConfig, desc: str) -> list[str]:
    # stopping at the markers changes no answer (clean_answer cuts there anyway); it skips decoding past them
    raw = generate(model, tok, prompts, max_new_tokens, cfg.evaluation.batch_size, progress=True, desc=desc,
                   stop_strings=STOP_MARKERS)
    return [clean_answer(a) for a in raw]


def _harmful(model, tok, cfg: ExperimentConfig, judge) -> tuple[dict, list[dict]]:
    ev = cfg.evaluation
    sets = [ev.harmful_set] + [s for s in ev.extra_harmful_sets if s != ev.harmful_set]
    limits = {s: ev.harmful_limit if s == ev.harmful_set else ev.extra_harmful_limit or ev.harmful_limit for s in sets}
    rows = [{**r, "set": s} for s in sets for r in data.harmful_prompts(s, limits[s])]
    prompts = [data.format_prompt(r["prompt"], "", cfg.data.template, tok) for r in rows]
    answers = _answers(model, tok, prompts, ev.max_new_tokens, cfg, "harmful prompts")
    flags = [bool(f) for f in judge([r["prompt"] for r in rows], answers)]
    samples = [{"set": r["set"], "prompt": r["prompt"], "answer": a, "verdict": "harmful" if f else "safe",
                "harmful": f, "categories": r["categories"]}
               for r, a, f in zip(rows, answers, flags)]
    main = [f for r, f in zip(rows, flags) if r["set"] == ev.harmful_set]
    metrics = {"harmful_score": percent(main), "n_harmful": len(main), "n_flagged": sum(main),
               "harmful_score_by_category": harmful_by_category(
                   [r for r in rows if r["set"] == ev.harmful_set], main)}
    for s in sets[1:]:
        fs = [f for r, f in zip(rows, flags) if r["set"] == s]
        metrics[f"harmful_score_{s}"], metrics[f"n_{s}"] = percent(fs), len(fs)
    return metrics, samples


def _task(model, tok, cfg: ExperimentConfig) -> tuple[dict, list[dict]]:
    task, ev = cfg.data.task, cfg.evaluation
    if ev.task_split == "dev":
        rows = data.task_dev_set(task, ev.task_limit, *cfg.task_train_use())
    else:
        rows = data.task_eval_set(task, ev.task_limit)
    prompts = [data.format_prompt(r["instruction"], r.get("input", ""), cfg.data.template, tok) for r in rows]
    budget = ev.task_max_new_tokens or TASK_MAX_NEW_TOKENS[task]
    answers = _answers(model, tok, prompts, budget, cfg, f"{task} {ev.task_split}")
    scored = [score_answer(task, a, r["output"]) for a, r in zip(answers, rows)]
    samples = [{"set": task, "prompt": r["instruction"] + ("\n" + r["input"] if r.get("input") else ""),
                "answer": a, "gold": r["output"], **s} for r, a, s in zip(rows, answers, scored)]
    lenient = percent([s["correct"] for s in scored])
    return {"task": task, "task_split": ev.task_split, "task_accuracy": lenient, "task_accuracy_lenient": lenient,
            "task_accuracy_strict": percent([s["correct_strict"] for s in scored]), "n_task": len(rows)}, samples


def evaluate(cfg: ExperimentConfig, base: Path, adapter: Path | None, out: Path, judge=None) -> dict:
    """HS and FA of base (+ adapter). Writes out/samples.jsonl and out/metrics.json (atomic); returns the metrics.

    judge None: nlsr.judges.get_judge(cfg.evaluation.judge, cfg.artifact_root, cfg.evaluation.judge_path).
    Scores are percentages; task_accuracy is the lenient (paper) reading.
    """
    t0 = time.time()
    if judge is None:
        from .judges import get_judge
        judge = get_judge(cfg.evaluation.judge, artifact_root=cfg.artifact_root, path=cfg.evaluation.judge_path,
                          device=cfg.model.device)
    model, tok = load_for_eval(cfg, Path(base), None if adapter is None else Path(adapter))
    t1 = time.time()
    harm, harm_samples = _harmful(model, tok, cfg, judge)
    t2 = time.time()
    task, task_samples = _task(model, tok, cfg)
    t3 = time.time()
    identity = getattr(judge, "identity", None)
    metrics = {**harm, **task, "judge": getattr(judge, "name", cfg.evaluation.judge),
               "judge_identity": identity() if callable(identity) else None,
               "samples": "samples.jsonl", "harmful_wall_s": round(t2 - t1, 2),
               "task_wall_s": round(t3 - t2, 2), "wall_s": round(time.time() - t0, 2)}
    with atomic_dir(out, overwrite=True) as tmp:
        data.write_jsonl(harm_samples + task_samples, tmp / "samples.jsonl")
        write_json(metrics, tmp / "metrics.json")  # 'samples' relative: the folder may be moved (artifact store)
    return {**metrics, "samples": str(Path(out) / "samples.jsonl")}
