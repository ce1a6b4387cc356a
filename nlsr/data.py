"""The shipped data (package files under nlsr/data), prompt templates, and the sets every stage trains or evaluates on.

All files are JSON Lines and are checked against `SHA256SUMS` on first use. Splits of one file between stages are
fixed index ranges (below), so that alignment, calibration, judge training and evaluation never share rows.
"""
from __future__ import annotations

from .errors import NLSRError

import hashlib
import json
import random
from functools import cache
from pathlib import Path
from typing import Callable

DATA_DIR = Path(__file__).parent / "data"

TASK_FILES = {t: {s: f"tasks/{t}/{s}.jsonl" for s in ("train", "test")} for t in ("sst2", "agnews", "gsm8k")}
SAFETY_FILES = {
    "beavertails": "safety/beavertails_train_unsafe.jsonl",  # poison pool, paper order
    "pure_bad": "safety/pure_bad.jsonl",
    "safe": "safety/beavertails_safe.jsonl",
    "unsafe_overlap": "safety/beavertails_unsafe_overlap.jsonl",
    "pairs": "safety/pku_saferlhf_pairs.jsonl",
    "harmful_eval": "safety/harmful_eval.jsonl",
    "harmful_dev": "safety/harmful_dev.jsonl",
    "advbench": "safety/advbench.jsonl",
    "harmbench": "safety/harmbench.jsonl",
}
HARMFUL_SETS = ("harmful_eval", "harmful_dev", "advbench", "harmbench")

# Fixed, disjoint index ranges inside one file.
SAFE_SFT = slice(0, 1000)        # beavertails_safe: safety SFT rows
SAFE_HELDOUT = slice(1000, None)  # beavertails_safe: held out (judge test split)
PAIRS_TRAIN = slice(0, 4000)     # pku pairs: preference alignment
PAIRS_CALIB = slice(4000, None)  # pku pairs: calibration (safe = chosen answers) for neuron scoring

# Prompt templates. Alpaca, as the paper's code uses everywhere (no chat template).
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


class DataError(NLSRError):
    """Bad data request or corrupted data file; the message names the file or the parameter."""


# ---------------------------------------------------------------------------------------------- files

@cache
def _checksums() -> dict[str, str]:
    sums = {}
    for line in (DATA_DIR / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def verify_file(rel: str) -> Path:
    path = DATA_DIR / rel
    if not path.is_file():
        raise DataError(f"data file {path} is missing (reinstall the package)")
    expected = _checksums().get(rel)
    if expected is None:
        raise DataError(f"data file {rel} is not listed in {DATA_DIR / 'SHA256SUMS'}")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise DataError(f"data file {path} is corrupted: sha256 {actual[:12]}... != expected {expected[:12]}...")
    return path


def jsonl_objects(path: Path, error: type[Exception] = DataError, expected: str = "a JSON object"):
    """(line number, object) for each non-blank line of a JSON Lines file; a line that is not valid JSON or not an
    object raises `error` naming the file and the line."""
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}, line {i}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}, line {i}: expected {expected}")
            yield i, row


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), strings: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSON Lines file; a bad line, a missing field or a field of `strings` that is not a non-empty string is
    an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file {path} does not exist")
    rows = []
    for i, row in jsonl_objects(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}, line {i}: missing field(s) {missing}; expected {list(required)}")
        bad = [k for k in strings if not (isinstance(row.get(k), str) and row[k].strip())]
        if bad:
            raise DataError(f"{path}, line {i}: field(s) {bad} must be non-empty strings")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


@cache
def _load(rel: str) -> tuple[dict, ...]:
    return tuple(read_jsonl(verify_file(rel)))


def load(name: str) -> list[dict]:
    """A shipped safety file by short name (see SAFETY_FILES), verified, as a fresh list of dicts."""
    if name not in SAFETY_FILES:
        raise DataError(f"unknown data set {name!r}; expected one of {sorted(SAFETY_FILES)}")
    return [dict(r) for r in _load(SAFETY_FILES[name])]


def load_task(task: str, split: str) -> list[dict]:
    if task not in TASK_FILES:
        raise DataError(f"unknown task {task!r}; expected one of {sorted(TASK_FILES)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r} for task {task}; expected 'train' or 'test'")
    return [dict(r) for r in _load(TASK_FILES[task][split])]


# ---------------------------------------------------------------------------------------------- templates

def format_prompt(instruction: str, input: str = "", template: str = "alpaca", tokenizer=None) -> str:
    """The prompt string a model sees. 'alpaca' is the paper's format; 'chat' uses the tokenizer's chat template."""
    if template == "alpaca":
        return (ALPACA_INPUT.format(instruction=instruction, input=input) if input
                else ALPACA_NO_INPUT.format(instruction=instruction))
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("template 'chat' needs a tokenizer with a chat template")
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise DataError(f"unknown template {template!r}; expected 'alpaca' or 'chat'")


def as_prompt_completion(rows: list[dict], template: str = "alpaca", tokenizer=None) -> list[dict]:
    """Alpaca rows -> {'prompt', 'completion'} rows (trl's prompt-completion format: loss on the completion)."""
    return [{"prompt": format_prompt(r["instruction"], r.get("input", ""), template, tokenizer),
             "completion": r["output"]} for r in rows]


# ---------------------------------------------------------------------------------------------- poisoned mix

def n_poison(n: int, p: float) -> int:
    # int(n·p) as in the release, guarded against float error (0.29 * 100 = 28.999...).
    return int(round(n * p, 9))


def poison_mix(task: str, n: int, p: float, seed: int = 0, poison_source: str = "beavertails") -> list[dict]:
    """The harmful fine-tuning set: the first n·p poison rows and the first n − n·p task rows, shuffled with `seed`.

    Each row: {instruction, input, output, flag}, flag 'finetune' (task) or 'unsafe' (poison).
    """
    if task not in TASK_FILES:
        raise DataError(f"unknown task {task!r}; expected one of {sorted(TASK_FILES)}")
    if not isinstance(n, int) or n < 1:
        raise DataError(f"n must be a positive integer, got {n!r}")
    if not 0.0 <= p <= 1.0:
        raise DataError(f"poison ratio p must be in [0, 1], got {p}")
    if poison_source not in ("beavertails", "pure_bad"):
        raise DataError(f"unknown poison source {poison_source!r}; expected 'beavertails' or 'pure_bad'")
    k = n_poison(n, p)
    pool, task_rows = load(poison_source), load_task(task, "train")
    if k > len(pool):
        raise DataError(f"the mix asks for {k} poison rows (n={n}, p={p}) but {SAFETY_FILES[poison_source]} "
                        f"has {len(pool)}")
    if n - k > len(task_rows):
        raise DataError(f"the mix asks for {n - k} {task} rows (n={n}, p={p}) but {TASK_FILES[task]['train']} has "
                        f"{len(task_rows)}; lower n or raise p")
    rows = [{"instruction": r["prompt"], "input": "", "output": r["response"], "flag": "unsafe"} for r in pool[:k]]
    rows += [{**r, "flag": "finetune"} for r in task_rows[:n - k]]
    random.Random(seed).shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------- alignment sets

def _take(rows: list[dict], n: int | None, what: str) -> list[dict]:
    if n is not None and n > len(rows):
        raise DataError(f"{what}: asked for {n} rows, only {len(rows)} available")
    return rows[:n] if n is not None else rows


def safety_sft_set(n: int | None = None, harmless_mix: float = 0.0, task: str = "sst2", seed: int = 0,
                   refuses: Callable[[str], bool] | None = None) -> list[dict]:
    """Safe answers to risky prompts (Alpaca rows), optionally mixed with harmless task rows.

    Harmless rows come from the *end* of the task's train file (the poisoned mix takes from its start), so
    that a model trained on refusals alone does not learn to refuse everything. `refuses` given: only the safe
    answers it calls refusals (alignment.safety_answers = 'refusals').
    """
    rows = [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in load("safe")[SAFE_SFT]
            if refuses is None or refuses(r["response"])]
    rows = _take(rows, n, "safety SFT set")
    k = n_poison(len(rows), harmless_mix)
    if k:
        task_rows = load_task(task, "train")
        rows = rows[:len(rows) - k] + task_rows[len(task_rows) - k:]
        random.Random(seed).shuffle(rows)
    return rows


def preference_set(n: int | None = None, template: str = "alpaca", tokenizer=None,
                   refuses: Callable[[str], bool] | None = None) -> list[dict]:
    """{prompt, chosen, rejected}: chosen is the safe answer (DPO / ORPO / SimPO). `refuses` given: only the pairs
    whose chosen answer it calls a refusal and whose rejected one it does not."""
    pairs = load("pairs")[PAIRS_TRAIN]
    if refuses is not None:
        pairs = [r for r in pairs if refuses(r["chosen"]) and not refuses(r["rejected"])]
    rows = _take(pairs, n, "preference set")
    return [{"prompt": format_prompt(r["prompt"], "", template, tokenizer), "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in rows]


def kto_set(n: int | None = None, template: str = "alpaca", tokenizer=None,
            refuses: Callable[[str], bool] | None = None) -> list[dict]:
    """{prompt, completion, label}: alternating desirable (chosen) and undesirable (rejected) answers, n in all."""
    pairs = preference_set(None if n is None else (n + 1) // 2, template, tokenizer, refuses)
    rows = []
    for r in pairs:
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows[:n] if n is not None else rows


def calibration_set(n: int, seed: int = 42) -> list[dict]:
    """{prompt, response}: safe answers to risky prompts for safety-critical neuron recognition.

    Drawn (seeded) from PKU-SafeRLHF pairs that preference alignment does not use, as the release draws 2,000
    samples with seed 42 from its filtered calibration pool.
    """
    pool = [{"prompt": r["prompt"], "response": r["chosen"]} for r in load("pairs")[PAIRS_CALIB]]
    if n > len(pool):
        raise DataError(f"calibration set: asked for {n} samples, only {len(pool)} available")
    rng = random.Random(seed)
    return rng.sample(pool, n)


# ---------------------------------------------------------------------------------------------- evaluation sets

def is_prompt_file(name: str) -> bool:
    """A harmful prompt set given as the path of a user's JSONL file rather than a shipped set's name."""
    return name not in HARMFUL_SETS and name.endswith(".jsonl")


def user_prompts(path: str | Path) -> list[dict]:
    """A user's harmful prompts: JSON Lines, one object per line with a non-empty string 'prompt' (and, optionally,
    a list of 'categories'); a bad line is an error naming the file and the line."""
    return read_jsonl(path, required=("prompt",), strings=("prompt",))


def harmful_prompts(name: str = "harmful_eval", limit: int | None = None) -> list[dict]:
    """{prompt, categories?} rows of a harmful prompt set, the first `limit` in file order: a shipped set
    (HARMFUL_SETS) or a user's JSONL file (a path ending in .jsonl, see user_prompts)."""
    if is_prompt_file(name):
        rows = user_prompts(name)
    elif name in HARMFUL_SETS:
        rows = load(name)
    else:
        raise DataError(f"unknown harmful prompt set {name!r}; expected one of {list(HARMFUL_SETS)} or the path "
                        f"of a .jsonl file with a 'prompt' per line")
    return [{"prompt": r["prompt"], "categories": r.get("categories") or []} for r in rows[:limit]]


TASK_DEV_ROWS = 200  # the task's dev split: enough for an accuracy to ±7 points, small enough to fit beside the mix


def task_eval_set(task: str, limit: int | None = None) -> list[dict]:
    return load_task(task, "test")[:limit]


def task_dev_set(task: str, limit: int | None, head: int, tail: int) -> list[dict]:
    """The task's dev split: TASK_DEV_ROWS rows of its *train* file that the cell never trains on, for choosing
    knobs without looking at the test rows (the paper's evaluation uses the whole test file, so dev cannot come
    from there). They sit just before the `tail` rows the safety SFT mixes in, and must not reach into the `head`
    rows the fine-tuning mix takes from the start (see poison_mix and safety_sft_set)."""
    rows = load_task(task, "train")
    end = len(rows) - tail
    start = end - TASK_DEV_ROWS
    if start < head:
        raise DataError(f"evaluation.task_split 'dev' needs {TASK_DEV_ROWS} {task} train rows that the cell does not "
                        f"train on, but the mix takes the first {head} and the safety SFT the last {tail} of "
                        f"{len(rows)}; lower data.n or use task_split 'test'")
    return rows[start:end][:limit]
