"""The README's table of knob sweeps ("How each defense's knob is chosen"), written from the sweeps' own files.

Every folder under docs/results/sweeps/ that holds a choice.json (copied there from
`<artifact_root>/grids/<sweep>/` after `nlsr grid configs/grids/sweep-<...>.yaml`) gives one row: each value
with its dev harmful score and dev task accuracy and their intervals (summary.csv), the fine-tuned model's dev
accuracy the rule compares with, and the value chosen. Sweeps named `-on-<cell>` ran on another cell
(`--base configs/<cell>.yaml`); a folder kept as evidence of a superseded run holds superseded.md (why) and is
skipped.

    python scripts/sweeps_table.py               # print the table
    python scripts/sweeps_table.py --readme      # replace it in README.md, between the sweeps-table markers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nlsr.report import read_csv

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "docs" / "results" / "sweeps"
START, END = "<!-- sweeps table -->", "<!-- /sweeps table -->"
HEADER = ("| cell | variant | knob | value: dev harmful score [95 % CI] / dev task accuracy [95 % CI] (✗: loses > 2 "
          "points) | fine-tuned accuracy (dev) | chosen | files |\n|---|---|---|---|---|---|---|")


def _ci(row: dict, name: str) -> str:
    return f"{row[name]:.1f} [{round(row[name + '_lo'])}, {round(row[name + '_hi'])}]"


def row(folder: Path) -> tuple[tuple, str]:
    """(sort key, Markdown row) of one sweep folder."""
    chosen = json.loads((folder / "choice.json").read_text())
    knob, variant = chosen["knob"], chosen["variant"]
    summary = {r[knob]: r for r in read_csv(folder / "summary.csv") if r["variant"] == variant}
    values = "; ".join(f"{c['value']}: {_ci(summary[c['value']], 'harmful_score')} / "
                       f"{_ci(summary[c['value']], 'task_accuracy')}" + ("" if c["within"] else " ✗")
                       for c in chosen["candidates"])
    cell = folder.name.split("-on-", 1)[1] if "-on-" in folder.name else "**default**"
    link = f"[{folder.name}](docs/results/sweeps/{folder.name}/results.md)"
    line = (f"| {cell} | `{variant}` | `{knob}` | {values} | {chosen['reference_accuracy']:.1f} | "
            f"**{chosen['value']}** | {link} |")
    return (cell != "**default**", cell, variant), line


def folders(sweeps: Path = SWEEPS) -> list[Path]:
    """The sweep folders the table shows: those with a choice.json, except superseded runs."""
    return sorted(f for f in sweeps.iterdir() if (f / "choice.json").is_file() and not (f / "superseded.md").exists())


def table(sweeps: Path = SWEEPS) -> str:
    rows = sorted(row(f) for f in folders(sweeps))
    return "\n".join([HEADER, *(line for _, line in rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", action="store_true", help="replace the table in README.md")
    args = p.parse_args(argv)
    text = table()
    if not args.readme:
        print(text)
        return 0
    readme = ROOT / "README.md"
    old = readme.read_text()
    if old.count(START) != 1 or old.count(END) != 1:
        print(f"{readme}: expected one {START} and one {END} marker", file=sys.stderr)
        return 2
    head, rest = old.split(START)
    tmp = readme.with_name(".README.md.tmp")
    tmp.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    tmp.replace(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
