"""Vlguard (defenses-spec §2): safety-data mixing. Guard rows (a harmful prompt → a safe answer) *replace* task rows
of the poisoned mix, and the Aligned ATTACK then runs on that mix.

Mix of n rows, as the NLSR release builds it: U = the first int(n·p) rows of the poison pool, G = the first int(n·g)
rows of the safety-SFT pool (so the guard rows are a subset of the SFT rows, as in NLSR), T = the first
n − |U| − |G| task rows. The pool is the one the cell's safety SFT draws from: with `alignment.safety_answers:
refusals` only the safe answers that decline, so that the guard rows teach the answer style the aligned model
learnt (BeaverTails' other safe answers mostly give advice, which would pull a refusal-aligned model away from
refusing). Unlike the release, the shuffle is seeded (the data seed) and g = 0 means "no guard rows"
(the release fails with a NameError there). Rows carry flag 'unsafe', 'safe' (guard) or 'finetune' (task).
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .. import data, training
from ..config import ExperimentConfig
from .config import VlguardConfig

NAME = "vlguard"
MIX_FILE = "mix.jsonl"  # inside the adapter folder: the mix it was trained on
STAGE = "finetune"


def guard_rows(k: int, refuses: Callable[[str], bool] | None = None) -> list[dict]:
    """The first k rows of the safety-SFT pool (only the refusals, given `refuses`: see
    `AlignmentConfig.answer_filter`), as Alpaca rows flagged 'safe'."""
    pool = data.safety_sft_set(refuses=refuses)
    if k > len(pool):
        kind = "safety-SFT pool" if refuses is None else "safety-SFT pool of refusals (alignment.safety_answers)"
        raise data.DataError(f"defenses: asked for {k} guard rows, the {kind} has {len(pool)}; lower the fraction")
    return [{**r, "flag": "safe"} for r in pool[:k]]


def guard_mix(task: str, n: int, p: float, g: float, seed: int = 0, poison_source: str = "beavertails",
              refuses: Callable[[str], bool] | None = None) -> list[dict]:
    """The Vlguard fine-tuning set: int(n·p) poison rows, int(n·g) guard rows, the rest task rows; shuffled with
    `seed`. At g = 0 it holds the same rows as `data.poison_mix(task, n, p, seed)`."""
    if not 0.0 <= g < 1.0:
        raise data.DataError(f"defenses.vlguard.guard_fraction must be in [0, 1), got {g}")
    k_unsafe, k_guard = data.n_poison(n, p), data.n_poison(n, g)
    if k_unsafe + k_guard > n:
        raise data.DataError(f"defenses.vlguard: {k_unsafe} poison + {k_guard} guard rows exceed n={n}; "
                             "lower guard_fraction")
    rows = _prefix_rows(task, n - k_guard, k_unsafe, poison_source) + guard_rows(k_guard, refuses)
    random.Random(seed).shuffle(rows)
    return rows


def _prefix_rows(task: str, n_rest: int, k_unsafe: int, poison_source: str) -> list[dict]:
    """The first k_unsafe poison rows and the first n_rest − k_unsafe task rows, in that order (unshuffled)."""
    pool, task_rows = data.load(poison_source), data.load_task(task, "train")
    if k_unsafe > len(pool) or n_rest - k_unsafe > len(task_rows):
        raise data.DataError(f"defenses.vlguard: the mix asks for {k_unsafe} poison and {n_rest - k_unsafe} "
                             f"{task} rows; the pools hold {len(pool)} and {len(task_rows)}")
    rows = [{"instruction": r["prompt"], "input": "", "output": r["response"], "flag": "unsafe"}
            for r in pool[:k_unsafe]]
    return rows + [{**r, "flag": "finetune"} for r in task_rows[:n_rest - k_unsafe]]


def write_mix(cfg: ExperimentConfig, out_file: Path, vc: VlguardConfig | None = None) -> Path:
    """The experiment's Vlguard mix as JSON Lines (data section + defenses.vlguard.guard_fraction)."""
    vc = vc or cfg.defenses.vlguard
    d = cfg.data
    return data.write_jsonl(guard_mix(d.task, d.n, d.poison_ratio, vc.guard_fraction, d.seed, d.poison_source,
                                      cfg.alignment.answer_filter()), out_file)


def finetune(cfg: ExperimentConfig, base: Path, adapter: Path, mix_file: Path | None, out: Path) -> dict:
    """The Aligned ATTACK (continue ΔW_a on W0) on the Vlguard mix of `cfg`; `out` = the adapter folder, which also
    keeps the mix trained on (out/mix.jsonl). `mix_file` (the cell's plain poisoned mix) is not read: the guard mix
    is rebuilt from the same data settings, so it holds the same poison rows."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="nlsr-vlguard-") as work:
        mix = write_mix(cfg, Path(work) / MIX_FILE)
        rows = data.read_jsonl(mix)
        result = training.finetune(cfg, base, adapter, mix, out, extra={
            "defense": NAME, "defense_stage": STAGE, **cfg.defenses.vlguard.model_dump()})
        shutil.copy2(mix, Path(out) / MIX_FILE)
    return {**result, "defense": NAME, "defense_stage": STAGE, "n_guard": sum(r.get("flag") == "safe" for r in rows),
            "wall_s": round(time.time() - t0, 2)}
