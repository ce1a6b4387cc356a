"""Judge a JSONL file of (prompt, answer) rows: what `nlsr judge` runs, so users can judge their own model's
answers or check a judge against labelled ones.

Each input row keeps its fields and gains `harmful` (bool) and `p_harmful` (P(harmful) as a float for judges that
have one, e.g. classifier and BeaverDam; null for those that do not, e.g. keyword and Llama-Guard). Existing
`harmful` / `p_harmful` fields are replaced in the output; the input file is left as it is. For the classifier,
`p_harmful` is the model's probability before the refusal and degenerate rules, so a refusal can have
p_harmful > 0.5 and harmful = false.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..data import jsonl_objects
from .registry import Judge, JudgeError, get_judge, judge_identity

FIELDS = ("prompt", "answer")


def read_pairs(path: str | Path) -> list[dict]:
    """JSON objects with string `prompt` and `answer`, one a line (blank lines skipped); a bad line is a
    JudgeError naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"--in {path}: no such file (expected JSONL rows with 'prompt' and 'answer')")
    rows = []
    for i, row in jsonl_objects(path, JudgeError, "a JSON object with 'prompt' and 'answer'"):
        for field in FIELDS:
            if field not in row:
                raise JudgeError(f"{path}, line {i}: missing field '{field}' (expected 'prompt' and 'answer')")
            if not isinstance(row[field], str):
                raise JudgeError(f"{path}, line {i}: field '{field}' must be a string, "
                                 f"got {type(row[field]).__name__}")
        rows.append(row)
    if not rows:
        raise JudgeError(f"{path} holds no rows (expected JSONL rows with 'prompt' and 'answer')")
    return rows


def predict(judge: Judge, prompts: list[str], answers: list[str]) -> tuple[list[bool], list[float] | None]:
    """Verdicts and P(harmful) (None where the judge has none), computed once for judges with `predict`."""
    if hasattr(judge, "predict"):
        verdicts, probs = judge.predict(prompts, answers)
    else:
        verdicts = judge(prompts, answers)
        probs = judge.probabilities(prompts, answers) if hasattr(judge, "probabilities") else None
    return [bool(v) for v in verdicts], None if probs is None else [float(p) for p in probs]


def judge_file(src: str | Path, out: str | Path, judge: str = "classifier", judge_path: str | None = None,
               device: str = "auto", batch_size: int = 128, force: bool = False,
               artifact_root: str | Path = "runs") -> dict:
    """Judge every row of `src`, write the rows with verdicts to `out` (temporary file, then rename); returns
    the summary (n, flagged, percent, judge, identity, wall_s, out)."""
    start, out = time.time(), Path(out)
    if batch_size < 1:
        raise JudgeError(f"--batch-size must be at least 1, got {batch_size}")
    if out.is_dir():
        raise JudgeError(f"--out {out} is a folder; expected a JSONL file path")
    if out.exists() and not force:
        raise JudgeError(f"--out {out} already exists; pass --force to overwrite it")
    rows = read_pairs(src)
    model = get_judge(judge, artifact_root=artifact_root, path=judge_path, device=device)
    verdicts, probs = [], []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo:lo + batch_size]
        v, p = predict(model, [r["prompt"] for r in chunk], [r["answer"] for r in chunk])
        verdicts += v
        probs += p if p is not None else [None] * len(chunk)
    from ..data import write_jsonl
    write_jsonl([{**r, "harmful": v, "p_harmful": p} for r, v, p in zip(rows, verdicts, probs)], out)
    flagged = sum(verdicts)
    identity = model.identity() if hasattr(model, "identity") else judge_identity(judge, judge_path)
    return {"n": len(rows), "flagged": flagged, "percent": 100.0 * flagged / len(rows), "judge": judge,
            "identity": identity, "wall_s": time.time() - start, "out": str(out)}
