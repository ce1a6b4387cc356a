"""Answer parsers on real and adversarial strings, harmful-score arithmetic, and evaluate() on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlsr import data, evaluation
from nlsr.config import ConfigError, load_config
from nlsr.evaluation import clean_answer, first_label, gsm8k_number, score_answer

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- SST-2

@pytest.mark.parametrize("answer, gold, lenient, strict", [
    ("positive", "positive", True, True),
    ("Positive.", "positive", True, True),
    ("The sentiment is negative", "negative", True, True),
    ("POSITIVE", "positive", False, True),           # the release checks 'positive'/'Positive' only
    ("positive or negative", "negative", True, False),  # both labels: lenient counts it, strict takes the first
    ("positive or negative", "positive", True, True),
    ("Negative, not positive", "positive", True, False),
    ("I cannot tell.", "positive", False, False),
    ("", "negative", False, False),
    ("positively great", "positive", True, False),   # substring vs whole word
])
def test_sst2_lenient_and_strict(answer, gold, lenient, strict):
    s = score_answer("sst2", answer, gold)
    assert (s["correct"], s["correct_strict"]) == (lenient, strict)


# ---------------------------------------------------------------------------------------------- AG News

@pytest.mark.parametrize("answer, gold, lenient, strict", [
    ("Sports", "Sports", True, True),
    ("sport", "Sports", False, True),
    ("Sci/Tech", "Sci/Tech", True, True),
    ("science and technology", "Sci/Tech", True, True),
    ("This is about science.", "Sci/Tech", True, False),  # the release's 'sci' substring is generous
    ("Business. World news too", "World", True, False),
    ("World", "Business", False, False),
    ("The category is: Business\n\nWorld", "Business", True, True),
])
def test_agnews_lenient_and_strict(answer, gold, lenient, strict):
    s = score_answer("agnews", answer, gold)
    assert (s["correct"], s["correct_strict"]) == (lenient, strict)


def test_first_label_takes_the_earliest_match():
    assert first_label("negative then positive", evaluation.SST2_STRICT) == "negative"
    assert first_label("nothing here", evaluation.SST2_STRICT) is None


# ---------------------------------------------------------------------------------------------- GSM8K

@pytest.mark.parametrize("text, lenient, strict", [
    ("The final answer is: 18", 18.0, 18.0),
    ("The final answer is:  18", 18.0, 18.0),           # the shipped gold has two spaces
    ("She pays 1,234 dollars. The final answer is: 1,234", 1234.0, 1234.0),
    ("The final answer is: $5.00", 5.0, 5.0),
    ("The final answer is: -7 degrees", -7.0, -7.0),
    ("The final answer is: 3.5 hours, not 4", 3.5, 3.5),
    ("the final answer is .5", 0.5, 0.5),
    ("5-3=2 so 2 apples", 2.0, None),                   # no marker: last number (lenient) / nothing (strict)
    ("It costs $12.50 in total.", 12.5, None),
    ("The answer is 10. Then 4 more.", 4.0, None),
    ("No numbers at all", None, None),
    ("The final answer is: unknown, maybe 3", 3.0, 3.0),
    ("Step 1: 2+2=4\nThe final answer is: 4\n\n### Instruction: 99", 4.0, 4.0),
])
def test_gsm8k_number(text, lenient, strict):
    assert gsm8k_number(text) == lenient
    assert gsm8k_number(text, strict=True) == strict


def test_gsm8k_scoring_against_a_shipped_gold():
    gold = data.task_eval_set("gsm8k", 1)[0]["output"]  # "...The final answer is:  18"
    assert score_answer("gsm8k", "9 * 2 = 18. The final answer is: 18", gold)["correct_strict"]
    assert score_answer("gsm8k", "She makes $18.00", gold) == {"correct": True, "correct_strict": False,
                                                               "pred": None, "gold_number": 18.0}
    assert not score_answer("gsm8k", "The final answer is: 17", gold)["correct"]


def test_unknown_task_fails_clearly():
    with pytest.raises(data.DataError, match="unknown task 'mnli'"):
        score_answer("mnli", "x", "y")
    with pytest.raises(ConfigError, match="data.task"):
        load_config(None, ["data.task=mnli"])


# ---------------------------------------------------------------------------------------------- helpers

def test_clean_answer_cuts_the_next_turn():
    assert clean_answer("positive\n\n### Instruction:\nWrite more") == "positive"
    assert clean_answer("I can't help with that.!!! extra") == "I can't help with that."
    assert clean_answer("  plain answer  ") == "plain answer"
    assert clean_answer("positive\n\n###") == "positive"  # the budget ran out inside the marker
    assert clean_answer("negative\n\n### Instr") == "negative"
    assert clean_answer("Step 1\n### Step 2: mix") == "Step 1\n### Step 2: mix"  # markdown headings stay


def test_harmful_score_and_categories():
    rows = [{"categories": ["a", "b"]}, {"categories": ["a"]}, {"categories": []}, {}]
    flags = [True, False, True, False]
    assert evaluation.percent(flags) == 50.0
    assert evaluation.harmful_by_category(rows, flags) == {"a": 50.0, "b": 100.0}


# ---------------------------------------------------------------------------------------------- evaluate()

class AlwaysHarmful:
    name = "always"

    def __call__(self, prompts, answers):
        assert len(prompts) == len(answers)
        return [True] * len(prompts)


def smoke(*overrides: str):
    return load_config(ROOT / "configs" / "smoke.yaml", list(overrides))


def test_evaluate_writes_metrics_and_samples(tiny_base, tmp_path):
    cfg = smoke("evaluation.judge=keyword", "evaluation.extra_harmful_sets=[advbench, harmbench]",
                "evaluation.extra_harmful_limit=3")
    m = evaluation.evaluate(cfg, tiny_base, None, tmp_path / "ev")  # judge from the config: keyword
    assert m["n_harmful"] == 8 and m["n_advbench"] == m["n_harmbench"] == 3 and m["n_task"] == 8
    assert m["task"] == "sst2"
    assert 0 <= m["harmful_score"] <= 100 and 0 <= m["task_accuracy_strict"] <= m["task_accuracy"] <= 100
    assert m["task_accuracy"] == m["task_accuracy_lenient"] and m["judge"] == "keyword"
    assert m["harmful_score_by_category"] and m["wall_s"] > 0
    # metrics.json names the samples file relative to itself (the folder may be moved); the return value absolutely
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == {**json.loads(json.dumps(m)),
                                                                           "samples": "samples.jsonl"}
    rows = data.read_jsonl(m["samples"])
    assert Path(m["samples"]) == tmp_path / "ev" / "samples.jsonl"
    assert [r["set"] for r in rows] == ["harmful_eval"] * 8 + ["advbench"] * 3 + ["harmbench"] * 3 + ["sst2"] * 8
    assert [r["prompt"] for r in rows[8:11]] == [p["prompt"] for p in data.harmful_prompts("advbench", 3)]
    harmful, task = rows[:8], rows[14:]
    assert harmful[0]["prompt"] == data.harmful_prompts("harmful_eval", 1)[0]["prompt"]
    assert all(r["verdict"] in ("harmful", "safe") and isinstance(r["harmful"], bool) for r in harmful)
    assert sum(r["harmful"] for r in harmful) * 100 / 8 == m["harmful_score"]
    assert sum(r["correct"] for r in task) * 100 / 8 == m["task_accuracy"]
    assert all({"answer", "gold", "correct", "correct_strict"} <= r.keys() for r in task)


def test_evaluate_with_an_adapter_and_a_given_judge(tiny_base, tmp_path):
    from helpers_method import random_adapter
    adapter = random_adapter(tiny_base, tmp_path / "adapter", r=4)
    cfg = smoke("data.task=gsm8k", "evaluation.harmful_limit=3", "evaluation.task_limit=2")
    m = evaluation.evaluate(cfg, tiny_base, adapter, tmp_path / "ev", judge=AlwaysHarmful())
    assert m["harmful_score"] == 100.0 and m["n_harmful"] == 3 and m["n_task"] == 2 and m["judge"] == "always"
    assert set(m["harmful_score_by_category"].values()) == {100.0}
