"""Trust, but check: file manifests of finished artifacts and the non-finite check on tensors.

A finished artifact's `_SUCCESS` records every file's size and xxh3-64 hash (`manifest`). A cache hit compares
them (`damage`): sizes always (a truncated or deleted file costs nothing to notice), hashes of files up to
`HASH_LIMIT` bytes (adapters, masks, JSON: milliseconds), and of every file when verification is asked for
(`nlsr run --verify`, or NLSR_VERIFY=full), because hashing a merged 8B model costs a full read of 16-32 GB.

Tensors (adapters, masks, merged weights) are checked for NaN / inf when written and when loaded
(`check_finite`): a non-finite weight makes every answer empty, and the judge would call empty answers safe.

Pure library code: no Prefect, no MLflow.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import xxhash

from .errors import NLSRError

HASH_LIMIT = 64 * 2**20   # files up to this size are hashed on every cache hit
CHUNK = 8 * 2**20
VERIFY_ENV = "NLSR_VERIFY"  # "full": hash every file on every hit (nlsr run --verify sets it)


class IntegrityError(NLSRError):
    """A file or tensor is damaged; the message names the file (and the tensor)."""


def file_hash(path: str | Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def manifest(folder: str | Path, skip: Iterable[str] = ()) -> dict[str, dict]:
    """{relative path: {"size": bytes, "xxh3": hex}} for every file under `folder` (or the file itself)."""
    folder = Path(folder)
    skip = set(skip)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "xxh3": file_hash(p)}
            for p in _files(folder) if p.relative_to(folder).as_posix() not in skip}


def full_verification() -> bool:
    return os.environ.get(VERIFY_ENV, "").lower() in ("1", "full", "true", "yes")


def damage(folder: str | Path, recorded: dict[str, dict], full: bool | None = None) -> list[str]:
    """What no longer matches the manifest (empty when intact): missing files, sizes, hashes."""
    folder = Path(folder)
    full = full_verification() if full is None else full
    problems = []
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, {want['size']} recorded")
        elif (full or size <= HASH_LIMIT) and file_hash(path) != want["xxh3"]:
            problems.append(f"{name} content differs from its recorded hash")
    return problems


def check_finite(tensors: dict, source: str | Path) -> None:
    """IntegrityError naming `source` and the first tensor holding NaN or inf (bool / int tensors pass)."""
    import torch
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise IntegrityError(f"{source}: tensor {name} holds {bad} non-finite value(s) (NaN or inf); the "
                                 f"file is damaged or the training diverged")
