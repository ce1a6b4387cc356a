"""Choosing a defense's knob on dev data, by one rule for every defense (README, "How each defense's knob is chosen").

A sweep grid (configs/grids/sweep-*.yaml) evaluates one defense at several values of its main knob, on dev data
only: the harmful_dev prompts and the task's dev rows (evaluation.task_split 'dev'), never the evaluation prompts.
The rule, applied to the sweep's seed-averaged summary:

    among the values whose task accuracy stays within `tolerance` points (default 2) of the undefended fine-tuned
    model's, take the one with the lowest harmful score; if no value keeps the accuracy, take the most accurate.

Ties go to the higher accuracy, then to the earlier value in the sweep's list (list the default first where it is
a candidate). Pure library code: rows in, a dict out.
"""
from __future__ import annotations

from typing import Iterable

from .errors import NLSRError

TOLERANCE = 2.0  # task-accuracy points a defense may lose against the undefended fine-tuned model
REFERENCE = "finetuned"  # the undefended fine-tuned model of the same cell


class ChoiceError(NLSRError):
    """A sweep's rows cannot decide its knob (a variant or value missing); the message says which."""


def choose(summary: Iterable[dict], knob: str, variant: str, values: list, tolerance: float = TOLERANCE) -> dict:
    """The chosen value of `knob` (a dotted config key, a column of the summary) for `variant`, by the rule above.

    Returns {knob, variant, value, kept_accuracy, reference_accuracy, tolerance, candidates: [{value,
    harmful_score, task_accuracy, within}]} where `within` says whether the value keeps the accuracy.
    """
    summary = list(summary)
    if not summary:
        raise ChoiceError(f"sweep of {knob}: no results to choose from")
    refs = [r["task_accuracy"] for r in summary if r.get("variant") == REFERENCE and r.get("task_accuracy") is not None]
    if not refs:
        raise ChoiceError(f"sweep of {knob}: no '{REFERENCE}' row to compare task accuracy with")
    reference = sum(refs) / len(refs)  # the same model at every value of a post-fine-tuning knob
    candidates = []
    for i, value in enumerate(values):
        row = next((r for r in summary if r.get("variant") == variant and _same(r.get(knob), value)), None)
        if row is None or row.get("harmful_score") is None or row.get("task_accuracy") is None:
            raise ChoiceError(f"sweep of {knob}: no '{variant}' result at {knob}={value!r}; rerun the sweep grid")
        candidates.append({"value": value, "harmful_score": row["harmful_score"], "task_accuracy": row["task_accuracy"],
                           "within": row["task_accuracy"] >= reference - tolerance, "order": i})
    kept = [c for c in candidates if c["within"]]
    if kept:
        best = min(kept, key=lambda c: (c["harmful_score"], -c["task_accuracy"], c["order"]))
    else:
        best = min(candidates, key=lambda c: (-c["task_accuracy"], c["harmful_score"], c["order"]))
    for c in candidates:
        del c["order"]
    return {"knob": knob, "variant": variant, "value": best["value"], "kept_accuracy": bool(kept),
            "reference_accuracy": reference, "tolerance": tolerance, "candidates": candidates}


def _same(a, b) -> bool:
    """Axis values come back from CSV and MLflow as strings or numbers: compare them as numbers where both are."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def markdown(choice: dict) -> str:
    """The sweep's candidates and the chosen value, as the README shows them."""
    head = (f"Knob `{choice['knob']}` of `{choice['variant']}`: chosen **{choice['value']}** "
            f"(lowest harmful score on harmful_dev with task accuracy on the dev rows ≥ "
            f"{choice['reference_accuracy']:.1f} − {choice['tolerance']:g}, the undefended fine-tuned model's"
            + ("" if choice["kept_accuracy"] else "; no value kept it, so the most accurate") + ")\n\n")
    lines = ["| value | harmful score (dev) | task accuracy (dev) | keeps accuracy |", "|---|---|---|---|"]
    for c in choice["candidates"]:
        mark = " ←" if _same(c["value"], choice["value"]) else ""
        lines.append(f"| {c['value']}{mark} | {c['harmful_score']:.1f} | {c['task_accuracy']:.1f} | "
                     f"{'yes' if c['within'] else 'no'} |")
    return head + "\n".join(lines) + "\n"


def knob_axis(axes: dict[str, list]) -> str:
    """The swept knob: the grid's one axis that is not a seed."""
    knobs = [a for a in axes if a.split(".")[-1] != "seed"]
    if len(knobs) != 1:
        raise ChoiceError(f"a sweep that chooses a knob needs exactly one non-seed axis, got {knobs}")
    return knobs[0]


def check_sweep(grid, cells) -> str:
    """Refuse a sweep that would choose on anything but dev data, or whose variant the cells do not evaluate.
    Returns the knob (the axis)."""
    from .dag import variants
    knob = knob_axis(grid.axes)
    for cfg in cells:
        ev = cfg.evaluation
        if ev.harmful_set != "harmful_dev" or ev.task_split != "dev" or ev.extra_harmful_sets:
            raise ChoiceError(f"grid {grid.name}: a sweep chooses on dev data only; expected evaluation.harmful_set="
                              f"harmful_dev, evaluation.task_split=dev and no extra_harmful_sets, got "
                              f"{ev.harmful_set}, {ev.task_split}, {ev.extra_harmful_sets}")
        if grid.choose.variant not in variants(cfg):
            raise ChoiceError(f"grid {grid.name}: choose.variant {grid.choose.variant!r} is not evaluated by the "
                              f"cells; expected one of {sorted(variants(cfg))}")
    return knob
