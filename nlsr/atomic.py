"""Write-then-rename helpers: a crash never leaves a half-written artifact where a finished one is expected."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


def _tmp_beside(final: Path) -> Path:
    """A new empty folder in `final`'s parent (same file system: the renames are atomic), hidden by its dot."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `final`; on success rename it into place, on error delete it.

    If `final` already exists (another process finished first) the new copy is discarded unless `overwrite`.
    """
    final = Path(final)
    tmp = _tmp_beside(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


@contextmanager
def atomic_files(out_dir: str | Path):
    """Yield a temporary folder beside `out_dir`; on success move each file written there into `out_dir` (replacing
    files of the same name, leaving every other file alone), on error delete it and change nothing.

    For folders a user names (`nlsr report --out`), which may hold files this command did not create: atomic_dir
    would replace the whole folder."""
    out_dir = Path(out_dir)
    tmp = _tmp_beside(out_dir)
    try:
        yield tmp
        out_dir.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path
