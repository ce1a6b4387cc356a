"""Results of cells and grids: one tidy table (CSV + Markdown) and a safety-vs-accuracy plot with the Pareto front.

A row is one evaluated model variant of one cell: the cell's grid axes (task, poison ratio, alignment method,
scorer, seed, data seed, ...), the variant ('aligned', 'finetuned', 'realigned', or a baseline such as 'safelora'), and its
harmful score (lower is better) and task accuracy (higher is better). Seeds are averaged in the summary table.

Pure library code (matplotlib with the Agg backend): no Prefect, no MLflow.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Iterable

AXES = ("task", "poison_ratio", "alignment", "scorer", "realign")
# Grid axes that already have a column above; any other non-seed grid axis (e.g. realign.layer_rate) becomes a
# column named by its dotted config key, and the summary keeps its values apart instead of averaging them.
AXIS_COLUMNS = {"data.task": "task", "data.poison_ratio": "poison_ratio", "alignment.method": "alignment",
                "scoring.method": "scorer", "realign.method": "realign"}
VARIANT_ORDER = ("aligned", "finetuned", "realigned", "safelora", "restore-modules", "nlsr", "antidote", "resta",
                 "resta-base")
ROW_FIELDS = ("name", *AXES, "seed", "data_seed", "variant", "defense", "defense_stage", "harmful_score", "task_accuracy", "config_hash", "eval_key")
SUMMARY_FIELDS = (*AXES, "variant", "n_seeds", "harmful_score", "harmful_std", "task_accuracy", "accuracy_std")


def cell_rows(descriptor: dict, evals: dict[str, dict], eval_keys: dict[str, str] | None = None) -> list[dict]:
    """Rows of one cell: its descriptor (grid axes) + each variant's harmful score and task accuracy."""
    rows = []
    for variant, metrics in evals.items():
        rows.append({**{k: descriptor.get(k) for k in ROW_FIELDS if k in descriptor}, "variant": variant,
                     "harmful_score": _num(metrics.get("harmful_score")),
                     "task_accuracy": _num(metrics.get("task_accuracy")),
                     "eval_key": (eval_keys or {}).get(variant)})
    return rows


def _num(x) -> float | None:
    return None if x is None else float(x)


def _variant_rank(v: str) -> tuple:
    return (VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER), v)


def extra_axes(axes: Iterable[str]) -> list[str]:
    """The grid axes that need their own column: not a seed (seeds are what the summary averages over) and not
    already one of AXES."""
    return [a for a in axes if a.split(".")[-1] != "seed" and a not in AXIS_COLUMNS]


def grouping(rows: Iterable[dict]) -> tuple[str, ...]:
    """AXES, then the extra grid-axis columns the rows carry (dotted config keys)."""
    return (*AXES, *sorted({k for r in rows for k in r if "." in k}))


def _sort_key(row: dict, axes: tuple[str, ...] = AXES) -> tuple:
    return tuple(str(row.get(a)) for a in axes) + (_variant_rank(row.get("variant", "")), row.get("seed") or 0,
                                                          row.get("data_seed") or 0)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Mean (and std over seeds) per grid point and variant; one row per (axes..., variant)."""
    rows = list(rows)
    axes = grouping(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(a) for a in axes) + (r["variant"],), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip((*axes, "variant"), key))
        row["n_seeds"] = len(members)  # cells averaged: seeds, or data seeds (the shuffle of the poisoned mix)
        for name, std in (("harmful_score", "harmful_std"), ("task_accuracy", "accuracy_std")):
            vals = [m[name] for m in members if m.get(name) is not None]
            row[name] = statistics.fmean(vals) if vals else None
            row[std] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(row)
    return sorted(out, key=lambda r: _sort_key(r, axes))


def summary_fields(rows: Iterable[dict]) -> tuple[str, ...]:
    return (*grouping(rows), *SUMMARY_FIELDS[len(AXES):])


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def markdown(rows: list[dict], fields: tuple[str, ...] | None = None) -> str:
    """A GitHub-style Markdown table of summary rows; harmful score ⬇ (lower is better), task accuracy ⬆."""
    fields = fields or summary_fields(rows)
    titles = {"harmful_score": "harmful score ⬇", "task_accuracy": "task accuracy ⬆"}
    head = "| " + " | ".join(titles.get(f, f) for f in fields) + " |"
    sep = "|" + "|".join("---" for _ in fields) + "|"
    body = ["| " + " | ".join(_fmt(r.get(f)) for f in fields) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_csv(rows: list[dict], path: str | Path, fields: tuple[str, ...] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = fields or tuple(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: str | Path) -> list[dict]:
    """Rows written by write_csv, numbers parsed back."""
    out = []
    with Path(path).open() as fh:
        for r in csv.DictReader(fh):
            out.append({k: _parse(v) for k, v in r.items()})
    return out


def _parse(v: str):
    if v == "":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower harmful score (x) and higher accuracy (y).

    Sorted by x; a point is on the front when its y beats every point with a smaller-or-equal x before it.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def plot(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Safety vs accuracy: x = harmful score (lower is better), y = task accuracy; one panel per task, one colour
    per variant, the Pareto front drawn and its points labelled. Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("harmful_score") is not None and r.get("task_accuracy") is not None]
    tasks = sorted({r.get("task") for r in points}, key=str) or ["(no results)"]
    variants = sorted({r["variant"] for r in points}, key=_variant_rank)
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in points if r.get("task") == task]
        for v in variants:
            pts = [r for r in mine if r["variant"] == v]
            if pts:
                ax.scatter([r["harmful_score"] for r in pts], [r["task_accuracy"] for r in pts], label=v,
                           color=colours[v], s=36, alpha=0.85, edgecolors="none")
        front = [mine[i] for i in pareto_front([(r["harmful_score"], r["task_accuracy"]) for r in mine])]
        if front:
            ax.step([r["harmful_score"] for r in front], [r["task_accuracy"] for r in front], where="post",
                    color="black", linewidth=1, linestyle="--", label="Pareto front")
            for r in front:
                ax.annotate(_point_label(r), (r["harmful_score"], r["task_accuracy"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        ax.set_title(str(task))
        ax.set_xlabel("harmful score (lower is better)")
        ax.set_ylabel("task accuracy (higher is better)")
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _point_label(r: dict) -> str:
    parts = [r["variant"]]
    if r.get("poison_ratio") is not None:
        parts.append(f"p={r['poison_ratio']}")
    if r.get("alignment"):
        parts.append(str(r["alignment"]))
    return " ".join(parts)


def write_results(rows: list[dict], out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """results.csv (every row), summary.csv + results.md (seed-averaged) and pareto.png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    axes = grouping(rows)
    rows = sorted(rows, key=lambda r: _sort_key(r, axes))
    summary = summarize(rows)
    extra = axes[len(AXES):]
    row_fields = (*ROW_FIELDS[:1 + len(AXES)], *extra, *ROW_FIELDS[1 + len(AXES):])
    paths = {"rows": write_csv(rows, out_dir / "results.csv", row_fields),
             "summary": write_csv(summary, out_dir / "summary.csv", summary_fields(rows)),
             "markdown": out_dir / "results.md",
             "plot": plot(rows, out_dir / "pareto.png", title)}
    paths["markdown"].write_text((f"# {title}\n\n" if title else "") + markdown(summary))
    return paths
