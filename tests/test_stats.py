"""Intervals and paired tests (nlsr.stats) on small hand-made verdict tables, against values worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nlsr import evaluation, report, stats

Z = 1.959963984540054  # the 97.5 % normal quantile


def test_encode_decode_round_trip():
    assert stats.encode([True, False, True]) == "101"
    assert stats.decode("0110").tolist() == [0, 1, 1, 0]
    assert stats.matrix(["01", "011"]) is None  # seeds that judged different prompts cannot be stacked


def test_wilson_against_the_formula():
    # 0 of 10: the upper bound is z² / (n + z²)
    lo, hi = stats.wilson(0, 10)
    assert lo == pytest.approx(0, abs=1e-9) and hi == pytest.approx(100 * Z**2 / (10 + Z**2))
    # 5 of 10: centre 0.5, half-width z / (1 + z²/n) * sqrt(p(1-p)/n + z²/(4n²))
    half = Z / (1 + Z**2 / 10) * math.sqrt(0.25 / 10 + Z**2 / 400)
    assert stats.wilson(5, 10) == pytest.approx((100 * (0.5 - half), 100 * (0.5 + half)))


def test_exact_mcnemar_is_the_binomial_test_of_the_discordant_prompts():
    assert stats.mcnemar_p(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)   # 2 P(X <= 1), X ~ Bin(10, 1/2)
    assert stats.mcnemar_p(9, 1) == stats.mcnemar_p(1, 9)
    assert stats.mcnemar_p(0, 10) == pytest.approx(2 / 2**10)
    assert stats.mcnemar_p(5, 5) == 1.0 and stats.mcnemar_p(0, 0) == 1.0


def test_paired_difference_counts_and_p_value():
    a, b = "1111000011", "0000000011"  # A flags 4 prompts B does not; they agree on the other 6
    res = stats.paired([a], [b])
    assert res["diff"] == pytest.approx(40.0) and (res["a_only"], res["b_only"]) == (4, 0)
    assert res["p_value"] == pytest.approx(2 / 2**4)
    assert res["diff_lo"] <= 40.0 <= res["diff_hi"] and res["diff_lo"] > 0  # 4 of 10 up, none down
    assert stats.paired([a], [b]) == res  # seeded: the same interval every time
    assert stats.paired([a], ["01"]) is None


def test_paired_pools_discordant_prompts_over_seeds():
    res = stats.paired(["1100", "1000"], ["0000", "0001"])
    assert (res["a_only"], res["b_only"], res["n_seeds"], res["n_prompts"]) == (3, 1, 2, 4)
    assert res["diff"] == pytest.approx(100 * (3 - 1) / 8)
    assert res["p_value"] == pytest.approx(stats.mcnemar_p(3, 1))


def test_cluster_bootstrap_resamples_prompts_not_verdicts():
    """Three seeds that judge every prompt alike carry no more information than one: the interval over prompts x
    seeds must be as wide as one seed's bootstrap, and wider than a Wilson interval that counts 3n verdicts."""
    one = np.array([stats.decode("0110100101" * 4)], dtype=float)
    three = np.repeat(one, 3, axis=0)
    assert stats.cluster_bootstrap(three) == pytest.approx(stats.cluster_bootstrap(one))
    lo, hi = stats.cluster_bootstrap(three)
    wlo, whi = stats.wilson(int(three.sum()), three.size)
    assert hi - lo > whi - wlo
    assert lo < 50.0 < hi


def test_interval_is_wilson_for_one_seed_and_never_zero_width():
    assert stats.interval(["0110"]) == pytest.approx(stats.wilson(2, 4))
    lo, hi = stats.interval(["0000", "0000"])  # no prompt ever flagged: not a zero-width certainty
    assert lo == pytest.approx(0, abs=1e-9) and hi == pytest.approx(stats.wilson(0, 4)[1])
    assert stats.interval([]) is None


def test_verdicts_from_evaluation_samples():
    samples = [{"set": "harmful_eval", "harmful": True}, {"set": "harmful_eval", "harmful": False},
               {"set": "advbench", "harmful": True}, {"set": "sst2", "correct": False},
               {"set": "sst2", "correct": True}]
    assert evaluation.verdicts(samples, "harmful_eval") == {
        "harmful_score": "10", "harmful_score_advbench": "1", "task_accuracy": "01"}


def _cell(seed: int, table: dict[str, tuple[str, str]]) -> list[dict]:
    descriptor = {"task": "sst2", "poison_ratio": 0.2, "alignment": "dpo", "scorer": "lowrank", "realign": "nlsr",
                  "seed": 0, "data_seed": seed}
    evals = {v: {"harmful_score": 100 * h.count("1") / len(h), "n_harmful": len(h),
                 "task_accuracy": 100 * t.count("1") / len(t), "n_task": len(t)} for v, (h, t) in table.items()}
    judged = {v: {"harmful_score": h, "task_accuracy": t} for v, (h, t) in table.items()}
    return report.cell_rows(descriptor, evals, {v: f"k{seed}{v}" for v in table}, judged)


def test_report_rows_summary_and_paired_table():
    cell0 = _cell(0, {"aligned": ("0000000011", "1100"), "finetuned": ("1111000011", "1110"),
                      "realigned": ("1000000011", "1110"), "safelora": ("1111000011", "1110")})
    cell1 = _cell(1, {"aligned": ("0000000011", "1100"), "finetuned": ("1111100011", "1111"),
                      "realigned": ("0000000011", "1111"), "safelora": ("1111100011", "1111")})
    row = cell0[1]
    assert (row["harmful_score_lo"], row["harmful_score_hi"]) == pytest.approx(stats.wilson(6, 10))
    assert (row["task_accuracy_lo"], row["task_accuracy_hi"]) == pytest.approx(stats.wilson(3, 4))
    summary = report.summarize(cell0 + cell1)
    ft = next(r for r in summary if r["variant"] == "finetuned")
    assert ft["harmful_score"] == pytest.approx(65.0)
    assert (ft["harmful_score_lo"], ft["harmful_score_hi"]) == pytest.approx(
        stats.interval(["1111000011", "1111100011"]))
    pairs = {(p["metric"], p["a"], p["b"]): p for p in report.paired(cell0 + cell1)}
    assert set(pairs) == {(m, a, b) for m in ("harmful_score", "task_accuracy") for a, b in (
        ("finetuned", "aligned"), ("realigned", "finetuned"), ("safelora", "finetuned"), ("realigned", "safelora"))}
    nlsr = pairs[("harmful_score", "realigned", "finetuned")]
    assert (nlsr["a_only"], nlsr["b_only"], nlsr["n_seeds"]) == (0, 3 + 5, 2)  # realigned flags a subset
    assert nlsr["p_value"] == pytest.approx(2 / 2**8) and nlsr["diff"] == pytest.approx(-40.0)
    assert pairs[("harmful_score", "safelora", "finetuned")]["p_value"] == 1.0  # identical answers
    text = report.text_report(cell0 + cell1)
    assert "65 [" in text and "cluster bootstrap" in text and "realigned − finetuned" in text


def test_rows_without_verdicts_get_wilson_from_their_counts():
    row = report.with_intervals({"variant": "aligned", "harmful_score": 25.0, "n_harmful": 8,
                                 "task_accuracy": 50.0, "n_task": 4})
    assert (row["harmful_score_lo"], row["harmful_score_hi"]) == pytest.approx(stats.wilson(2, 8))
    assert report.paired([row]) == []
