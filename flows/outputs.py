"""`--out` of the stage commands never destroys: a folder is replaced only when it is an earlier output of the same
command (marked by `nlsr_output.json`), or with `--force`.

The library writes folders with write-then-rename and replaces an existing one (a stage's own output). On the
command line the target is whatever the user typed: `--out runs` must not wipe an artifact store, nor
`--out ~/thesis` a folder of notes.
"""
from __future__ import annotations

import json
from pathlib import Path

from nlsr.errors import NLSRError

MARKER = "nlsr_output.json"


def add_force(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is an existing folder that this command did not write")


def check_out_folder(out: str | Path, command: str, force: bool = False) -> Path:
    """Refuse an existing, non-empty `out` that is not an earlier output of `nlsr <command>` (unless `force`)."""
    out = Path(out)
    if not out.exists():
        return out
    if not out.is_dir():
        raise NLSRError(f"--out {out} is an existing file; `nlsr {command}` writes a folder there")
    if force or not any(out.iterdir()) or written_by(out) == command:
        return out
    raise NLSRError(f"--out {out} is an existing folder that `nlsr {command}` did not write (no {MARKER}); "
                    f"choose a new folder, or pass --force to replace it and everything in it")


def check_out_file(out: str | Path, command: str) -> Path:
    """A file output may replace a file, never a folder."""
    out = Path(out)
    if out.is_dir():
        raise NLSRError(f"--out {out} is an existing folder; `nlsr {command}` writes a file there (e.g. "
                        f"{out / 'out.json'})")
    return out


def mark_out_folder(out: str | Path, command: str) -> None:
    (Path(out) / MARKER).write_text(json.dumps({"command": command}) + "\n")


def written_by(out: Path) -> str | None:
    try:
        return json.loads((out / MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None
