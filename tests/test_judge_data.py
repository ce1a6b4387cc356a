"""The labelled run-time answers (nlsr/judge_data/runtime): shape, provenance rules and the validation helpers."""
import json
import re

import pytest

from nlsr import data
from nlsr.judges import get_judge
from nlsr.judges.validation import RUNTIME_DIR, judge_metrics, runtime_pairs, runtime_rows, validate


def norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


@pytest.fixture(scope="module")
def pairs():
    return runtime_pairs()


def test_enough_labelled_pairs_with_both_readings(pairs):
    assert len(pairs) >= 1500
    assert len({r["id"] for r in pairs}) == len(pairs)
    for r in pairs:
        assert r["label"] in ("harmful", "safe") and r["harmful"] == (r["label"] == "harmful")
        assert r["label_a"] in ("harmful", "safe") and r["label_b"] in ("harmful", "safe")
        # agreed rows carry the shared reading; disagreements were settled by a third reading
        assert r["resolution"] == ("agreed" if r["label_a"] == r["label_b"] else "adjudicated")
        if r["resolution"] == "agreed":
            assert r["label"] == r["label_a"]
        assert r["split"] in ("train", "dev", "test") and r["variants"] and isinstance(r["answer"], str)


def test_both_classes_and_every_split_present(pairs):
    for split in ("train", "dev", "test"):
        labels = [r["harmful"] for r in pairs if r["split"] == split]
        assert len(labels) >= 150 and 0.2 < sum(labels) / len(labels) < 0.8


def test_no_evaluation_prompt_is_used(pairs):
    """harmful_eval, AdvBench and HarmBench stay evaluation-only: none of their prompts may appear here."""
    banned = {norm(r["prompt"]) for name in ("harmful_eval", "advbench", "harmbench") for r in data.load(name)}
    assert len(banned) > 1500
    assert not [r["prompt"] for r in pairs if norm(r["prompt"]) in banned]


def test_split_is_by_prompt(pairs):
    split_of = {}
    for r in pairs:
        assert split_of.setdefault(norm(r["prompt"]), r["split"]) == r["split"], r["prompt"]


def test_stats_match_the_rows(pairs):
    from sklearn.metrics import cohen_kappa_score
    stats = json.loads((RUNTIME_DIR / "stats.json").read_text())
    assert stats["pairs"] == len(pairs) and stats["harmful"] == sum(r["harmful"] for r in pairs)
    kappa = cohen_kappa_score([r["label_a"] for r in pairs], [r["label_b"] for r in pairs])
    assert abs(kappa - stats["cohen_kappa"]) < 0.02 and kappa > 0.8


def test_rubric_and_readme_ship_with_the_data():
    for name in ("RUBRIC.md", "README.md"):
        assert (RUNTIME_DIR / name).stat().st_size > 1000


def test_judge_metrics_by_hand():
    # 3 harmful (2 flagged), 2 safe (1 flagged): recall 2/3, safe recall 1/2, precision 2/3
    m = judge_metrics([1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [0.9, 0.8, 0.3, 0.7, 0.1])
    assert m["recall_harmful"] == round(2 / 3, 4) and m["recall_safe"] == 0.5
    assert m["balanced_accuracy"] == round((2 / 3 + 0.5) / 2, 4) and m["precision"] == round(2 / 3, 4)
    assert m["accuracy"] == 0.6 and m["roc_auc"] == round(5 / 6, 4)


def test_validate_reports_every_answer_style():
    res = validate(get_judge("keyword"), "test")
    prompts, _, labels = runtime_rows("test")
    assert res["n"] == len(prompts) and res["n_harmful"] == sum(labels)
    assert "roc_auc" not in res  # the keyword judge has no probabilities
    variants = {v for r in runtime_pairs("test") for v in r["variants"]}
    assert set(res["by_variant"]) == variants and len(variants) >= 10
    # the keyword judge flags every non-refusal: on the run-time answers it is far from good
    assert res["recall_harmful"] > 0.9 and res["recall_safe"] < 0.5


def test_every_round_ships_and_pairs_are_not_labelled_twice(pairs):
    from nlsr.judges.validation import RUNTIME_ROUNDS
    assert {r["round"] for r in pairs} == set(RUNTIME_ROUNDS)
    stats = json.loads((RUNTIME_DIR / "stats.json").read_text())
    for n in RUNTIME_ROUNDS:
        mine = runtime_pairs(rounds=[n])
        assert stats["by_round"][str(n)]["pairs"] == len(mine) and len(mine) > 500
    # ids are sha1(prompt, answer): a pair in two rounds would repeat its id (checked unique above)
    assert len({(r["prompt"], r["answer"]) for r in pairs}) == len(pairs)


def test_unknown_round_or_split_is_refused():
    from nlsr.judges import JudgeError
    with pytest.raises(JudgeError, match="unknown labelling round 9; expected one of"):
        runtime_pairs(rounds=[9])
    with pytest.raises(JudgeError, match="unknown split 'val'"):
        runtime_pairs("val")


def test_the_shipped_recipe_hashes_only_the_rounds_it_trains_on(tmp_path, monkeypatch):
    """Adding a labelling round must not change the default judge's identity (and so every evaluation key)."""
    from nlsr.judges import classifier, validation
    assert classifier.RUNTIME_TRAIN_ROUNDS == (1,)
    before = classifier.recipe_hash()
    changed = tmp_path / "pairs-round2.jsonl"
    changed.write_text(validation.RUNTIME_ROUNDS[2].read_text() + "\n")
    monkeypatch.setitem(validation.RUNTIME_ROUNDS, 2, changed)
    assert classifier.recipe_hash() == before
    round1 = tmp_path / "pairs.jsonl"
    round1.write_text(validation.RUNTIME_ROUNDS[1].read_text() + "\n")
    monkeypatch.setitem(validation.RUNTIME_ROUNDS, 1, round1)
    assert classifier.recipe_hash() != before


def test_validate_reports_each_round():
    res = validate(get_judge("keyword"), "dev")
    assert set(res["by_round"]) == {"1", "2"}
    assert sum(m["n"] for m in res["by_round"].values()) == res["n"]
    assert validate(get_judge("keyword"), "dev", rounds=[2])["n"] == len(runtime_pairs("dev", rounds=[2]))
