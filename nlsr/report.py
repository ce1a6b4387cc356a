"""Results of cells and grids: one tidy table (CSV + Markdown) and a safety-vs-accuracy plot with the Pareto front.

A row is one evaluated model variant of one cell: the cell's grid axes (task, poison ratio, alignment method,
scorer, seed, data seed, ...), the variant ('aligned', 'finetuned', 'realigned', or a baseline such as 'safelora'), and its
harmful score (lower is better) and task accuracy (higher is better), each with its 95 % interval (`<score>_lo`,
`<score>_hi`; nlsr.stats says how) and, in rows.json, the per-prompt verdicts it was computed from. Seeds are
averaged in the summary table; the paired table compares the variants of each grid point on the same prompts
(difference, interval, exact McNemar p-value), so a reader can tell which differences are more than noise; a
grid's `compare:` axes add the same test between grid points (each neuron scorer against low-rank, say).

Pure library code (matplotlib with the Agg backend): no Prefect, no MLflow.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Iterable

from . import stats
from .atomic import atomic_files
from .data import write_jsonl

AXES = ("task", "poison_ratio", "alignment", "scorer", "realign")
# Grid axes that already have a column above; any other non-seed grid axis (e.g. realign.layer_rate) becomes a
# column named by its dotted config key, and the summary keeps its values apart instead of averaging them.
AXIS_COLUMNS = {"data.task": "task", "data.poison_ratio": "poison_ratio", "alignment.method": "alignment",
                "scoring.method": "scorer", "realign.method": "realign"}
# Table order of the variants: the cell's own rows first, then every defense in its registry's order (nlsr.methods),
# so a newly registered method needs no edit here.
VARIANT_HEAD = ("aligned", "finetuned", "realigned", "safelora", "restore-modules")
ROW_FIELDS = ("name", *AXES, "seed", "data_seed", "variant", "defense", "defense_stage", "harmful_score", "harmful_score_lo", "harmful_score_hi",
              "n_harmful", "task_accuracy", "task_accuracy_lo", "task_accuracy_hi", "n_task", "config_hash", "eval_key", "defense_s")
SUMMARY_FIELDS = (*AXES, "variant", "n_seeds", "harmful_score", "harmful_score_lo", "harmful_score_hi", "harmful_std",
                  "task_accuracy", "task_accuracy_lo", "task_accuracy_hi", "accuracy_std")
PAIRED_FIELDS = ("metric", "a", "b", "n_seeds", "n_prompts", "diff", "diff_lo", "diff_hi", "a_only", "b_only",
                 "p_value")
ROWS_FILE = "rows.jsonl"  # every row, verdicts included: what `nlsr report --rows` reads back
SIGNIFICANCE = 0.05  # the level of every "significant" here: a * in the paired tables, a share shown in a pivot
EXTRA = "harmful_score_"  # harmful_score_<set>: the harmful score on an extra prompt set (AdvBench, HarmBench)
COUNTS = {"harmful_score": "n_harmful", "task_accuracy": "n_task"}  # else n_<set> for harmful_score_<set>


def cell_rows(descriptor: dict, evals: dict[str, dict], eval_keys: dict[str, str] | None = None,
              verdicts: dict[str, dict[str, str]] | None = None) -> list[dict]:
    """Rows of one cell: its descriptor (grid axes) + each variant's harmful score(s) and task accuracy, their
    intervals, and (when given: variant -> nlsr.evaluation.verdicts) the per-prompt verdicts under 'verdicts'."""
    rows = []
    for variant, metrics in evals.items():
        row = {**{k: descriptor.get(k) for k in ROW_FIELDS if k in descriptor}, "variant": variant}
        for name in ("harmful_score", *extra_scores([metrics]), "task_accuracy"):
            row[name] = _num(metrics.get(name))
            count = _count_field(name)
            if metrics.get(count) is not None:
                row[count] = int(metrics[count])
        if verdicts and variant in verdicts:
            row["verdicts"] = dict(verdicts[variant])
        rows.append(with_intervals({**row, "eval_key": (eval_keys or {}).get(variant)}))
    return rows


def extra_scores(rows: Iterable[dict]) -> list[str]:
    """harmful_score_<set> names present in rows (or evaluation metrics), sorted: numbers with a count n_<set>."""
    return sorted({k for r in rows for k in r
                   if k.startswith(EXTRA) and not k.endswith(("_lo", "_hi")) and f"n_{k[len(EXTRA):]}" in r})


def score_names(rows: Iterable[dict]) -> list[str]:
    rows = list(rows)
    return ["harmful_score", "task_accuracy", *extra_scores(rows)]


def _count_field(name: str) -> str:
    return COUNTS.get(name) or f"n_{name[len(EXTRA):]}"


def with_intervals(row: dict) -> dict:
    """Adds <score>_lo / <score>_hi to a cell row: Wilson from its verdicts, else from its score and count (rows
    rebuilt from MLflow metrics have no verdicts)."""
    row = dict(row)
    for name in score_names([row]):
        v = (row.get("verdicts") or {}).get(name)
        if v:
            ci = stats.interval([v])
        elif row.get(name) is not None and row.get(_count_field(name)):
            n = int(row[_count_field(name)])
            ci = stats.wilson(round(row[name] * n / 100), n)
        else:
            continue
        row[f"{name}_lo"], row[f"{name}_hi"] = ci
    return row


def _num(x) -> float | None:
    return None if x is None else float(x)


def variant_order() -> tuple[str, ...]:
    from .methods import ALIGNMENT_DEFENSES, FINETUNE_DEFENSES, REALIGNERS
    names = (*VARIANT_HEAD, *REALIGNERS.names(), *FINETUNE_DEFENSES.names(), *ALIGNMENT_DEFENSES.names())
    return tuple(dict.fromkeys(names))


def variant_rank(v: str) -> tuple:
    """Table position: the registry order; a stacked variant ('nlsr-on-lisa') right after its defense."""
    from .methods import stacked_defense
    order, defense = variant_order(), stacked_defense(v)
    head = defense or v
    return (order.index(head) if head in order else len(order), defense is not None, v)


def extra_axes(axes: Iterable[str]) -> list[str]:
    """The grid axes that need their own column: not a seed (seeds are what the summary averages over) and not
    already one of AXES."""
    return [a for a in axes if a.split(".")[-1] != "seed" and a not in AXIS_COLUMNS]


def grouping(rows: Iterable[dict]) -> tuple[str, ...]:
    """AXES, then the extra grid-axis columns the rows carry (dotted config keys)."""
    return (*AXES, *sorted({k for r in rows for k in r if "." in k}))


def _sort_key(row: dict, axes: tuple[str, ...] = AXES) -> tuple:
    return tuple(str(row.get(a)) for a in axes) + (variant_rank(row.get("variant", "")), row.get("seed") or 0,
                                                          row.get("data_seed") or 0)


def _seed_order(r: dict) -> tuple:
    return (r.get("seed") or 0, r.get("data_seed") or 0)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Mean (and std over seeds) per grid point and variant, with the interval over prompts × seeds (nlsr.stats:
    Wilson for one seed, the cluster bootstrap for several); one row per (axes..., variant)."""
    rows = list(rows)
    axes, names = grouping(rows), score_names(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(a) for a in axes) + (r["variant"],), []).append(r)
    out = []
    for key, members in groups.items():
        members = sorted(members, key=_seed_order)
        row = dict(zip((*axes, "variant"), key))
        row["n_seeds"] = len(members)  # cells averaged: seeds, or data seeds (the shuffle of the poisoned mix)
        for name in names:
            vals = [m[name] for m in members if m.get(name) is not None]
            row[name] = statistics.fmean(vals) if vals else None
            std = {"harmful_score": "harmful_std", "task_accuracy": "accuracy_std"}.get(name)
            if std:
                row[std] = statistics.stdev(vals) if len(vals) > 1 else None
            verdicts = [(m.get("verdicts") or {}).get(name) for m in members]
            ci = stats.interval(verdicts) if all(verdicts) else None
            if ci is None and len(members) == 1 and members[0].get(f"{name}_lo") is not None:
                ci = (members[0][f"{name}_lo"], members[0][f"{name}_hi"])
            row[f"{name}_lo"], row[f"{name}_hi"] = ci or (None, None)
        stages = {m.get("defense_stage") for m in members} - {None}
        if stages:
            row["defense_stage"] = stages.pop() if len(stages) == 1 else "/".join(sorted(stages))
        costs = [m["defense_s"] for m in members if m.get("defense_s") is not None]
        if costs:  # the defense's own compute beyond the undefended pipeline, mean over the seeds that ran it
            row["defense_s"] = statistics.fmean(costs)
        out.append(row)
    return sorted(out, key=lambda r: _sort_key(r, axes))


def summary_fields(rows: Iterable[dict]) -> tuple[str, ...]:
    rows = list(rows)
    extras = tuple(f for name in extra_scores(rows) for f in (name, f"{name}_lo", f"{name}_hi"))
    defense = tuple(f for f in ("defense_stage", "defense_s") if any(r.get(f) is not None for r in rows))
    return (*grouping(rows), *SUMMARY_FIELDS[len(AXES):], *extras, *defense)


def comparisons(variants: Iterable[str]) -> list[tuple[str, str]]:
    """(A, B) pairs compared as A − B: the fine-tuning's effect, the realignment's, each baseline's, the
    realignment against each baseline, and a stacked variant ('nlsr-on-lisa') against its defense alone."""
    from .methods import stacked_defense
    present = set(variants)
    baselines = sorted(present - {"aligned", "finetuned", "realigned"}, key=variant_rank)
    pairs = [("finetuned", "aligned"), ("realigned", "finetuned"), *((b, "finetuned") for b in baselines),
             *(("realigned", b) for b in baselines),
             *((b, stacked_defense(b)) for b in baselines if stacked_defense(b))]  # what stacking adds
    return [(a, b) for a, b in pairs if a in present and b in present]


def _pair(a: dict[tuple, dict], b: dict[tuple, dict], name: str) -> dict | None:
    """nlsr.stats.paired on score `name` of two rows per seed (seed -> row), over the seeds both have; None when
    there are none or a row lacks that score's verdicts."""
    seeds = sorted(set(a) & set(b))
    va, vb = [a[s]["verdicts"].get(name) for s in seeds], [b[s]["verdicts"].get(name) for s in seeds]
    return stats.paired(va, vb) if seeds and all(va) and all(vb) else None


def paired(rows: Iterable[dict]) -> list[dict]:
    """Paired differences per grid point and score (nlsr.stats.paired): the cells (seeds) that evaluated both
    variants, on the same prompts. Rows without verdicts are left out."""
    rows = [r for r in rows if r.get("verdicts")]
    axes, names = grouping(rows), score_names(rows)
    groups: dict[tuple, dict[str, dict[tuple, dict]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(a) for a in axes), {}).setdefault(r["variant"], {})[_seed_order(r)] = r
    out = []
    for key, by_variant in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        for name in names:
            for a, b in comparisons(by_variant):
                res = _pair(by_variant[a], by_variant[b], name)
                if res is not None:
                    out.append({**dict(zip(axes, key)), "metric": name, "a": a, "b": b, **res})
    return out


def paired_fields(rows: Iterable[dict]) -> tuple[str, ...]:
    return (*grouping(rows), *PAIRED_FIELDS)


def axis_column(axis: str) -> str:
    """The table column of a grid axis given by its dotted config key (scoring.method -> scorer) or its column."""
    return AXIS_COLUMNS.get(axis, axis)


def across(rows: Iterable[dict], axis: str, reference) -> list[dict]:
    """Paired differences between grid points that differ only in `axis` (a dotted config key or its column):
    each variant at every other value of the axis minus the same variant at `reference`, on the same prompts and
    seeds, e.g. each neuron scorer's realigned model against low-rank's (`compare:` of a grid). A variant the axis
    does not reach (the same evaluation at both points: the fine-tuned model across scorers) is left out."""
    col = axis_column(axis)
    rows = [r for r in rows if r.get("verdicts")]
    axes = [a for a in grouping(rows) if a != col]
    groups: dict[tuple, dict[str, dict[tuple, dict]]] = {}
    for r in rows:
        key = (tuple(r.get(a) for a in axes), r["variant"])
        groups.setdefault(key, {}).setdefault(str(r.get(col)), {})[_seed_order(r)] = r
    out = []
    for (point, variant), by_value in sorted(groups.items(), key=lambda kv: (tuple(map(str, kv[0][0])),
                                                                             variant_rank(kv[0][1]))):
        ref = by_value.get(str(reference)) or {}
        for value, by_seed in by_value.items():
            if value == str(reference) or _same_evaluations(by_seed, ref):
                continue
            for name in score_names(rows):
                if name == "task_accuracy" and col == "task":  # other tasks' rows: nothing to pair
                    continue
                res = _pair(by_seed, ref, name)
                if res is not None:
                    out.append({**dict(zip(axes, point)), "variant": variant, "metric": name,
                                "a": f"{variant} ({value})", "b": f"{variant} ({reference})", **res})
    return out


def _same_evaluations(a: dict[tuple, dict], b: dict[tuple, dict]) -> bool:
    """True when the seeds both have evaluated the very same model (same evaluation key), or there are none."""
    return all(a[s].get("eval_key") and a[s].get("eval_key") == b[s].get("eval_key") for s in set(a) & set(b))


def across_fields(rows: Iterable[dict], axis: str) -> tuple[str, ...]:
    return (*(a for a in grouping(rows) if a != axis_column(axis)), "variant", *PAIRED_FIELDS)


def across_markdown(rows: list[dict], compare: dict | None) -> str:
    """One paired table per `compare` axis (axis -> reference value), titled by it; empty without any."""
    parts = []
    for axis, reference in (compare or {}).items():
        table = paired_markdown(across(rows, axis, reference))
        if table:
            parts.append(f"Across {axis_column(axis)}: each value against {reference}, same variant, same prompts "
                         f"and seeds.\n\n{table}")
    return "\n".join(parts)


def pivot(summary: list[dict], axis: str, values: Iterable | None = None,
          pairs: Iterable[dict] | None = None) -> list[dict]:
    """The paper's layout (its Tables 1, 2 and 5): one column per value of grid axis `axis` (in the order of
    `values` and only those that have rows; default: numbers by value, then words) and a 'mean' column over them.
    One row per variant and score: each variant's harmful score, the share of the fine-tuning's increase each
    defense removes ((finetuned − variant) / (finetuned − aligned), in %), then each variant's task accuracy. With
    `pairs` (`paired` of the same rows) a share is left blank where the increase itself is not significant
    (finetuned vs aligned, p ≥ 0.05): a share of a chance increase (+1.6 points: 200 % removed) means nothing. The
    summary's other axes must hold one value each (the columns differ in `axis` only); else ValueError."""
    col = axis_column(axis)
    fixed = [a for a in grouping(summary) if a != col and len({str(r.get(a)) for r in summary}) > 1]
    if fixed:
        raise ValueError(f"pivot {axis}: the rows also differ in {', '.join(fixed)}; expected rows that differ in "
                         f"{axis} alone")
    present = sorted({str(r.get(col)) for r in summary}, key=_value_order)
    columns = [v for v in map(str, values) if v in present] if values is not None else present  # a partial grid
    cell = {(str(r.get(col)), r["variant"]): r for r in summary}
    variants = sorted({r["variant"] for r in summary}, key=variant_rank)
    out = []

    def line(label: str, metric: str, value_of) -> None:
        row = {"row": label, "metric": metric, **{v: value_of(v) for v in columns}}
        vals = [row[v] for v in columns]
        row["mean"] = statistics.fmean(vals) if vals and None not in vals else None
        if any(x is not None for x in vals):
            out.append(row)

    def score(v: str, variant: str, name: str) -> float | None:
        return (cell.get((v, variant)) or {}).get(name)

    chance = {str(r.get(col)) for r in pairs or () if (r["metric"], r["a"], r["b"]) ==
              ("harmful_score", "finetuned", "aligned") and (r["p_value"] is None or r["p_value"] >= SIGNIFICANCE)}

    def removed(v: str, variant: str) -> float | None:
        ft, al, x = score(v, "finetuned", "harmful_score"), score(v, "aligned", "harmful_score"), \
            score(v, variant, "harmful_score")
        return None if None in (ft, al, x) or ft <= al or v in chance else 100 * (ft - x) / (ft - al)

    for variant in variants:
        line(f"{variant}: harmful score", "harmful_score", lambda v, n=variant: score(v, n, "harmful_score"))
    for variant in variants:
        if variant not in ("aligned", "finetuned"):
            line(f"{variant}: share of the increase removed", "removed", lambda v, n=variant: removed(v, n))
    for variant in variants:
        line(f"{variant}: task accuracy", "task_accuracy", lambda v, n=variant: score(v, n, "task_accuracy"))
    return out


def _value_order(v: str) -> tuple:
    """Numbers by value (p 0.05 before 0.1, 9 before 10), then words alphabetically."""
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def pivot_markdown(rows: list[dict]) -> str:
    """The pivot as a Markdown table: scores to one decimal, shares in whole percent."""
    if not rows:
        return ""
    columns = [k for k in rows[0] if k not in ("row", "metric")]

    def cell(r: dict, k: str) -> str:
        x = r.get(k)
        return "" if x is None else f"{x:.0f} %" if r["metric"] == "removed" else f"{x:.1f}"
    lines = ["|  | " + " | ".join(columns) + " |", "|---|" + "|".join("---" for _ in columns) + "|",
             *("| " + r["row"] + " | " + " | ".join(cell(r, k) for k in columns) + " |" for r in rows)]
    return "\n".join(lines) + "\n"


def pivot_caption(axis: str) -> str:
    return (f"At a glance, one column per {axis} (means over the seeds; harmful score ⬇, task accuracy ⬆; share "
            f"removed = (finetuned − variant) / (finetuned − aligned), blank where the fine-tuning's increase is not "
            f"significant, exact McNemar p ≥ {SIGNIFICANCE}):")


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _fmt_ci(row: dict, name: str) -> str:
    """'44.27 [35.9, 53.0]': the value and its 95 % interval, when the row has one."""
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    value = _fmt(row.get(name))
    return f"{value} [{lo:.1f}, {hi:.1f}]" if value and lo is not None and hi is not None else value


def _title(field: str) -> str:
    if field == "harmful_score":
        return "harmful score ⬇ [95 % CI]"
    if field == "task_accuracy":
        return "task accuracy ⬆ [95 % CI]"
    if field.startswith(EXTRA):
        return f"HS {field[len(EXTRA):]} ⬇ [95 % CI]"
    if field == "defense_s":
        return "defense cost (s)"
    return field


def markdown(rows: list[dict], fields: tuple[str, ...] | None = None) -> str:
    """A GitHub-style Markdown table of summary rows; harmful score ⬇ (lower is better), task accuracy ⬆; a score
    with <score>_lo/_hi shows its interval in brackets (the _lo/_hi columns are not repeated)."""
    fields = [f for f in (fields or summary_fields(rows)) if not f.endswith(("_lo", "_hi"))]
    scores = {f for f in fields if any(f"{f}_lo" in r for r in rows)}
    head = "| " + " | ".join(_title(f) for f in fields) + " |"
    sep = "|" + "|".join("---" for _ in fields) + "|"
    body = ["| " + " | ".join(_fmt_ci(r, f) if f in scores else _fmt(r.get(f)) for f in fields) + " |"
            for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def interval_caption(summary: list[dict]) -> str:
    """Which interval the brackets of a summary table are."""
    seeds = {r.get("n_seeds") for r in summary}
    parts = []
    if 1 in seeds:
        parts.append(f"one seed: {stats.METHODS['cell']}")
    if seeds - {1}:
        parts.append(f"several seeds: {stats.METHODS['seeds']}")
    return "95 % intervals in brackets (" + "; ".join(parts) + ")." if parts else ""


def paired_markdown(rows: list[dict]) -> str:
    """The paired differences: A − B in points with its interval, the discordant prompts and the p-value."""
    if not rows:
        return ""
    axes = [a for a in grouping(rows) if len({str(r.get(a)) for r in rows}) > 1]  # only the axes that vary
    head = ["metric", *axes, "A − B", "n_seeds", "prompts", "difference [95 % CI]", "only A / only B",
            "p (exact McNemar)"]
    body = []
    for r in rows:
        star = " *" if r["p_value"] < SIGNIFICANCE else ""
        body.append([r["metric"], *(_fmt(r.get(a)) for a in axes), f"{r['a']} − {r['b']}", str(r["n_seeds"]),
                     str(r["n_prompts"]), f"{r['diff']:+.2f} [{r['diff_lo']:+.1f}, {r['diff_hi']:+.1f}]",
                     f"{r['a_only']} / {r['b_only']}", f"{r['p_value']:.3g}{star}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
             *("| " + " | ".join(b) + " |" for b in body)]
    return "\n".join(lines) + f"\n\nPaired on the same prompts: {stats.METHODS['paired']}; * p < {SIGNIFICANCE}.\n"


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
    per variant, 95 % intervals as error bars, an arrow from each grid point's fine-tuned model to its realigned
    one, the Pareto front drawn and its points labelled by variant (by the grid's knob instead, when the points differ
    in one). `rows`: summary rows (or cell rows). Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("harmful_score") is not None and r.get("task_accuracy") is not None]
    tasks = sorted({r.get("task") for r in points}, key=str) or ["(no results)"]
    variants = sorted({r["variant"] for r in points}, key=variant_rank)
    style = variant_styles(variants)  # variant -> (colour, marker)
    wide = len(variants) > 6  # a long legend goes beside the panels, where it hides no point
    labels = []  # (axes, text, data point, colour): placed once the layout is final, clear of each other
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks) + (2.2 if wide else 0), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in points if r.get("task") == task]
        for v in variants:
            pts = [r for r in mine if r["variant"] == v]
            if pts:
                ax.errorbar([r["harmful_score"] for r in pts], [r["task_accuracy"] for r in pts],
                            xerr=_err(pts, "harmful_score"), yerr=_err(pts, "task_accuracy"), fmt=style[v][1], label=v,
                            color=style[v][0], markersize=5, alpha=0.85, elinewidth=0.8, capsize=2)
        _moves(ax, mine)
        # the columns that tell this panel's points apart: a sweep's knob, or an axis such as the scorer (Table 5)
        knobs = sorted({k for r in mine for k in r if "." in k}) \
            + [a for a in AXES[1:] if len({str(r.get(a)) for r in mine}) > 1]
        for same in _coincident(mine) if knobs else ():  # which value each point is, for the variants a knob moves
            r = same[0]
            if len({(p["harmful_score"], p["task_accuracy"]) for p in mine if p["variant"] == r["variant"]}) > 1:
                labels.append((ax, _knob_label(same, knobs), (r["harmful_score"], r["task_accuracy"]),
                               style[r["variant"]][0]))
        front = [mine[i] for i in pareto_front([(r["harmful_score"], r["task_accuracy"]) for r in mine])]
        if front:
            ax.step([r["harmful_score"] for r in front], [r["task_accuracy"] for r in front], where="post",
                    color="black", linewidth=1, linestyle="--", label="Pareto front")
        # with knob labels the colour alone says the variant; otherwise the front's points are named, and so is
        # any other place where one variant hides another
        if not knobs:
            texts = {(r["harmful_score"], r["task_accuracy"]): place_label(r, mine) for r in mine}
            on_front = {(r["harmful_score"], r["task_accuracy"]) for r in front}
            labels += [(ax, text, at, "black") for at, text in texts.items() if at in on_front or " = " in text]
        ax.set_title(str(task) + (f" (point labels: {', '.join(knobs)})" if knobs else ""), fontsize=10)
        ax.set_xlabel("harmful score (lower is better)")
        ax.set_ylabel("task accuracy (higher is better)")
        ax.grid(alpha=0.3)
        if mine and not wide:
            ax.legend(fontsize=7, loc="best")
    if wide and points:
        legend = {}  # label -> handle, over every panel (a task may lack a variant)
        for ax in axes[0]:
            legend.update(zip(*reversed(ax.get_legend_handles_labels())))
        fig.legend(list(legend.values()), list(legend), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _place_labels(labels, fig.dpi)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


MARKERS = ("o", "s", "^", "D", "v", "P")


def variant_styles(variants: list[str]) -> dict[str, tuple[tuple, str]]:
    """(colour, marker) per variant, all distinct: tab10's ten colours with circles, then again with squares, ...
    (a grid of 16 defenses would otherwise repeat colours and two variants would read as one)."""
    import matplotlib

    tab10 = matplotlib.colormaps["tab10"]
    return {v: (tab10(i % 10), MARKERS[i // 10 % len(MARKERS)]) for i, v in enumerate(variants)}


def _err(points: list[dict], name: str):
    """Asymmetric error bars (below, above) from <name>_lo/_hi; None when a point has no interval."""
    if any(r.get(f"{name}_lo") is None or r.get(f"{name}_hi") is None for r in points):
        return None
    return [[max(0.0, r[name] - r[f"{name}_lo"]) for r in points], [max(0.0, r[f"{name}_hi"] - r[name]) for r in points]]


def _moves(ax, points: list[dict]) -> None:
    """An arrow fine-tuned -> realigned per grid point (and seed, for cell rows): what the realignment did."""
    keys = [a for a in points[0] if a in AXES or "." in a or a in ("seed", "data_seed")] if points else []
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in points:
        by_point.setdefault(tuple(str(r.get(k)) for k in keys), {})[r["variant"]] = r
    for pair in by_point.values():
        if "finetuned" in pair and "realigned" in pair:
            a, b = pair["finetuned"], pair["realigned"]
            ax.annotate("", xy=(b["harmful_score"], b["task_accuracy"]),
                        xytext=(a["harmful_score"], a["task_accuracy"]),
                        arrowprops=dict(arrowstyle="->", color="0.35", linewidth=1, shrinkA=4, shrinkB=4))


LABEL_SIZE = 6  # points


def _place_labels(labels: list[tuple], dpi: float) -> None:
    """Annotate each point below-right of itself, moved further down where it would cover another label."""
    for ax in {id(a): a for a, *_ in labels}.values():
        mine = [(text, xy, colour) for a, text, xy, colour in labels if a is ax]
        anchors = [tuple(p * 72 / dpi for p in ax.transData.transform(xy)) for _, xy, _ in mine]
        drops = spread_labels(anchors, [0.65 * LABEL_SIZE * len(t) for t, _, _ in mine], LABEL_SIZE + 2)
        for (text, xy, colour), drop in zip(mine, drops):
            ax.annotate(text, xy, fontsize=LABEL_SIZE, xytext=(3, -9 - drop), textcoords="offset points",
                        color=colour)


def spread_labels(anchors: list[tuple[float, float]], widths: list[float], height: float,
                  tries: int = 12) -> list[float]:
    """How far (in points) to move each label down so that no two label boxes overlap. A label's box spans
    [x, x + width] x [y - drop, y - drop + height] around its anchor (x, y), in points; labels are placed from the
    top of the panel down, each moved by `height` until it is clear of those placed (at most `tries` times)."""
    placed: list[tuple[float, float, float, float]] = []
    drops = [0.0] * len(anchors)

    def box(i: int) -> tuple[float, float, float, float]:
        x, y = anchors[i]
        return x, y - drops[i], x + widths[i], y - drops[i] + height

    for i in sorted(range(len(anchors)), key=lambda i: (-anchors[i][1], anchors[i][0])):
        for _ in range(tries):
            a = box(i)
            if not any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3] for b in placed):
                break
            drops[i] += height
        placed.append(box(i))
    return drops


def _coincident(points: list[dict]) -> list[list[dict]]:
    """The points grouped by variant and position: one label per group, not several printed on top of each other
    (the aligned model of every P_L of a sweep is one evaluation, at one place)."""
    groups: dict[tuple, list[dict]] = {}
    for r in points:
        groups.setdefault((r["variant"], r["harmful_score"], r["task_accuracy"]), []).append(r)
    return list(groups.values())


def place_label(point: dict, points: list[dict]) -> str:
    """The variants at `point`'s place, joined by ' = ': a defense that changed nothing (SafeLoRA projecting no
    module) is drawn exactly over the fine-tuned model, and the label says so instead of naming only one of them."""
    at = (point["harmful_score"], point["task_accuracy"])
    same = {r["variant"] for r in points if (r["harmful_score"], r["task_accuracy"]) == at} | {point["variant"]}
    return " = ".join(sorted(same, key=variant_rank))


def _knob_label(same: list[dict], knobs: list[str]) -> str:
    """The knob values of a group of coincident points; a knob that differs within the group (it does not move
    this point) is left out, e.g. 'orpo' for the aligned model of every P_L."""
    return ", ".join(str(same[0].get(k)) for k in knobs if len({str(r.get(k)) for r in same}) == 1) or "all"


def text_report(rows: list[dict], compare: dict | None = None, pivots: dict | None = None) -> str:
    """The summary table with its interval caption, then one pivot per `pivots` axis (axis -> column order or
    None), then the paired differences within each grid point, then those across the `compare` axes (axis ->
    reference value): what `nlsr report` prints."""
    return _text(rows, summarize(rows), paired(rows), compare, pivots)


def _text(rows: list[dict], summary: list[dict], pairs: list[dict], compare: dict | None,
          pivots: dict | None) -> str:
    """text_report from the summary and paired differences already computed (write_results has them)."""
    text = markdown(summary, summary_fields(rows))
    caption = interval_caption(summary) if any(r.get("harmful_score_lo") is not None for r in summary) else ""
    glance = "".join(f"\n{pivot_caption(axis)}\n\n{pivot_markdown(pivot(summary, axis, order, pairs))}"
                     for axis, order in (pivots or {}).items())
    paired_text, cross = paired_markdown(pairs), across_markdown(rows, compare)
    return text + (f"\n{caption}\n" if caption else "") + glance + (f"\n{paired_text}" if paired_text else "") \
        + (f"\n{cross}" if cross else "")


def write_results(rows: list[dict], out_dir: str | Path, title: str | None = None,
                  compare: dict | None = None, pivots: dict | None = None, appendix: str = "") -> dict[str, Path]:
    """results.csv (every row), rows.jsonl (every row with its per-prompt verdicts: everything else here can be
    rebuilt from it, `nlsr report --rows`), summary.csv (seed-averaged), paired.csv (paired differences),
    across-<axis>.csv per `compare` axis (paired differences between grid points), pivot-<axis>.csv per `pivots`
    axis (the paper's layout), results.md (summary, pivot and paired tables) and pareto.png (the summary, with
    intervals) in `out_dir`; `appendix` (Markdown) ends results.md."""
    with atomic_files(out_dir) as tmp:  # a failure half-way leaves the folder as it was
        names = _write_results(rows, tmp, title, compare, pivots, appendix)
    return {key: Path(out_dir) / name for key, name in names.items()}


def _write_results(rows: list[dict], out_dir: Path, title: str | None, compare: dict | None,
                   pivots: dict | None, appendix: str = "") -> dict[str, str]:
    axes = grouping(rows)
    rows = sorted(rows, key=lambda r: _sort_key(r, axes))
    summary, pairs = summarize(rows), paired(rows)
    extra = axes[len(AXES):]
    extras = tuple(f for name in extra_scores(rows) for f in (name, f"{name}_lo", f"{name}_hi", f"n_{name[len(EXTRA):]}"))
    row_fields = (*ROW_FIELDS[:1 + len(AXES)], *extra, *ROW_FIELDS[1 + len(AXES):-2], *extras, *ROW_FIELDS[-2:])
    paths = {"rows": write_csv(rows, out_dir / "results.csv", row_fields),
             "rows_jsonl": write_jsonl(rows, out_dir / ROWS_FILE),
             "summary": write_csv(summary, out_dir / "summary.csv", summary_fields(rows)),
             "paired": write_csv(pairs, out_dir / "paired.csv", paired_fields(rows)),
             "markdown": out_dir / "results.md",
             "plot": plot(summary, out_dir / "pareto.png", title)}
    for axis, reference in (compare or {}).items():
        paths[f"across-{axis}"] = write_csv(across(rows, axis, reference), out_dir / f"across-{axis}.csv",
                                            across_fields(rows, axis))
    for axis, order in (pivots or {}).items():
        table = pivot(summary, axis, order, pairs)
        paths[f"pivot-{axis}"] = write_csv(table, out_dir / f"pivot-{axis}.csv")
    paths["markdown"].write_text((f"# {title}\n\n" if title else "") + _text(rows, summary, pairs, compare, pivots)
                                 + (f"\n{appendix}" if appendix else ""))
    return {key: Path(p).name for key, p in paths.items()}
