"""Non-Aligned (defenses-spec §1): the undefended attack on a model our pipeline never aligned.

The ATTACK of the Aligned cell (same poisoned mix, seed and optimiser settings, the `finetune` section), but started
from the raw base M_raw with a fresh LoRA (PEFT's default init: A Kaiming-uniform, B = 0), so no W0 or ΔW_a tensor
is ever loaded. The CPU base (SmolLM2-135M-*Instruct*) is already instruction-tuned by its makers: here
"Non-Aligned" means "not aligned by this pipeline", which the result records.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import training
from ..config import ExperimentConfig

NAME = "non-aligned"
STAGE = "finetune"
NOTE = "raw base, fresh LoRA: not aligned by this pipeline (an Instruct base is still aligned by its makers)"


def finetune(cfg: ExperimentConfig, raw_base: Path, adapter: Path | None, mix_file: Path, out: Path) -> dict:
    """Fine-tune a fresh LoRA on `raw_base` (M_raw, not W0) on the poisoned mix; `out` = the adapter folder.
    `adapter` must be None (the signature of every fine-tuning-stage defense): nothing aligned is continued."""
    t0 = time.time()
    if adapter is not None:
        raise training.TrainingError(f"Non-Aligned starts from a fresh LoRA on the raw base; got adapter {adapter}")
    result = training.finetune(cfg, Path(raw_base), None, mix_file, out,
                               extra={"defense": NAME, "defense_stage": STAGE})
    return {**result, "defense": NAME, "defense_stage": STAGE, "note": NOTE, "wall_s": round(time.time() - t0, 2)}
