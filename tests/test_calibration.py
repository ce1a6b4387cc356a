"""Calibration sets for neuron scoring: the release's reference-model answers, filtered by a judge, and the keys."""
from pathlib import Path

import pytest

from helpers_method import random_adapter
from nlsr import modeling
from nlsr.calibration import CALIBRATION_FILE, CalibrationError, calibration_rows, reference_answers
from nlsr.config import ScoringConfig, load_config
from nlsr.data import calibration_set, format_prompt, read_jsonl
from nlsr.evaluation import clean_answer
from nlsr.generation import generate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def flag_odd(prompts, answers):
    """A judge with a known verdict per position, so the filter itself is what is tested."""
    return [i % 2 == 1 for i in range(len(prompts))]


@pytest.fixture(scope="module")
def reference(tiny_base, tmp_path_factory):
    return random_adapter(tiny_base, tmp_path_factory.mktemp("calib") / "reference", r=4, seed=7, scale=0.3)


def test_reference_answers_keep_what_the_judge_finds_safe(tiny_base, reference, tmp_path):
    cfg = ScoringConfig(calibration="reference", n_samples=4, calibration_max_new_tokens=8)
    rows, info = reference_answers(tiny_base, reference, cfg, flag_odd, device="cpu", save_to=tmp_path)
    saved = read_jsonl(tmp_path / CALIBRATION_FILE)
    assert [s["prompt"] for s in saved] == [r["prompt"] for r in calibration_set(8, cfg.seed)]  # pool = 2 × n
    assert [s["harmful"] for s in saved] == [False, True] * 4
    assert rows == [{"prompt": s["prompt"], "response": s["response"]} for s in saved
                    if s["response"] and not s["harmful"]]
    assert info == {"calibration": "reference", "calibration_answered": 8, "calibration_safe": len(rows)}
    again, _ = reference_answers(tiny_base, reference, cfg, flag_odd, device="cpu")
    assert again == rows  # greedy: the same set every time


def test_answers_come_from_the_reference_model(tiny_base, reference, tmp_path):
    cfg = ScoringConfig(calibration="reference", n_samples=3, calibration_pool=6, calibration_max_new_tokens=8)
    reference_answers(tiny_base, reference, cfg, flag_odd, device="cpu", save_to=tmp_path)
    saved = read_jsonl(tmp_path / CALIBRATION_FILE)
    tok = modeling.load_tokenizer(tiny_base)
    prompts = [format_prompt(s["prompt"], "", "alpaca", tok) for s in saved]

    def answers(model):
        return [clean_answer(a) for a in generate(model.eval(), tok, prompts, 8)]
    merged = modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"), reference).merge_and_unload()
    assert [s["response"] for s in saved] == answers(merged)
    assert answers(modeling.load_model(tiny_base, device="cpu")) != answers(merged)  # not the bare base


def test_nothing_safe_is_an_error(tiny_base, reference):
    cfg = ScoringConfig(calibration="reference", n_samples=2, calibration_max_new_tokens=4)
    with pytest.raises(CalibrationError, match="flagged .*all 4 reference-model answers"):
        reference_answers(tiny_base, reference, cfg, lambda p, a: [True] * len(p), device="cpu")


def test_pool_smaller_than_the_sample_is_refused():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="calibration_pool .* must be at least scoring.n_samples"):
        ScoringConfig(calibration="reference", n_samples=8, calibration_pool=4)


def test_safe_calibration_is_the_shipped_answers(tmp_path):
    cfg = load_config(SMOKE, [f"artifact_root={tmp_path}"])
    rows, info = calibration_rows(cfg, Path("unused"), Path("unused"))
    assert rows == calibration_set(cfg.scoring.n_samples, cfg.scoring.seed) and info == {"calibration": "safe"}


def test_score_key_reads_generation_settings_only_when_generating(tmp_path):
    from tasks.keys import plan

    def key(*sets):
        return plan(load_config(SMOKE, [f"artifact_root={tmp_path}", *sets]))["score"].key
    safe = key()
    assert key("scoring.calibration_pool=64", "scoring.calibration_max_new_tokens=16") == safe  # not read
    gen = key("scoring.calibration=reference")
    assert gen != safe
    assert key("scoring.calibration=reference", "evaluation.judge=classifier") != gen  # the judge filters
    assert key("scoring.calibration=reference", "scoring.calibration_max_new_tokens=16") != gen
