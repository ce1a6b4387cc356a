"""The calibration set for safety-critical neuron recognition (`scoring.calibration`).

- `safe`: the shipped safe (chosen) answers of the PKU-SafeRLHF pairs that alignment does not use. No generation.
- `reference`: the release's way (spec A1.4): the safety reference model (W0 + the amplified adapter) answers risky
  prompts greedily with the Alpaca template; each answer is cut at a new Alpaca turn or the release's '!!!', and only
  the answers the judge does not flag are kept. The neurons are then scored on what the reference model itself
  says when it refuses, which is what the amplified adapter encodes.
"""
from __future__ import annotations

from pathlib import Path

from . import data, modeling
from .config import ExperimentConfig, ScoringConfig
from .errors import NLSRError
from .evaluation import clean_answer
from .generation import generate

CALIBRATION_FILE = "calibration.jsonl"


class CalibrationError(NLSRError):
    """The calibration set cannot be built (e.g. the judge flags every reference answer)."""


def reference_answers(base: Path, reference: Path, cfg: ScoringConfig, judge, *, template: str = "alpaca",
                      device: str = "auto", dtype: str = "float32", batch_size: int = 16,
                      save_to: Path | None = None) -> tuple[list[dict], dict]:
    """{prompt, response} rows the reference model answered safely, and counts for the report.

    `cfg.pool_size()` prompts (a seeded draw from the calibration prompts) are answered; the scorer then draws
    at most `cfg.n_samples` of the safe ones. `save_to`: a folder for every answer with its verdict (inspection).
    """
    prompts = [r["prompt"] for r in data.calibration_set(cfg.pool_size(), cfg.seed)]
    model = modeling.load_adapter(modeling.load_model(base, dtype, device), reference).merge_and_unload().eval()
    tok = modeling.load_tokenizer(base)
    formatted = [data.format_prompt(p, "", template, tok) for p in prompts]
    answers = [clean_answer(a) for a in generate(model, tok, formatted, cfg.calibration_max_new_tokens,
                                                 batch_size, progress=True, desc="calibration answers")]
    flags = [bool(f) for f in judge(prompts, answers)]
    if save_to is not None:
        data.write_jsonl([{"prompt": p, "response": a, "harmful": f} for p, a, f in zip(prompts, answers, flags)],
                         Path(save_to) / CALIBRATION_FILE)
    rows = [{"prompt": p, "response": a} for p, a, f in zip(prompts, answers, flags) if a and not f]
    if not rows:
        raise CalibrationError(f"the judge flagged (or found empty) all {len(prompts)} reference-model answers; "
                               "no calibration sample is left (check the reference adapter and the judge)")
    return rows, {"calibration": "reference", "calibration_answered": len(prompts),
                  "calibration_safe": len(rows)}


def calibration_rows(cfg: ExperimentConfig, base: Path, reference: Path,
                     save_to: Path | None = None) -> tuple[list[dict], dict]:
    """The calibration rows that `cfg.scoring.calibration` names, and what to report about them."""
    sc = cfg.scoring
    if sc.calibration == "safe":
        return data.calibration_set(sc.n_samples, sc.seed), {"calibration": "safe"}
    from .judges import get_judge
    ev = cfg.evaluation
    judge = get_judge(ev.judge, artifact_root=cfg.artifact_root, path=ev.judge_path, device=cfg.model.device)
    return reference_answers(base, reference, sc, judge, template=cfg.data.template, device=cfg.model.device,
                             dtype=cfg.model.dtype, batch_size=ev.batch_size, save_to=save_to)
