"""How sure a harmful score or a task accuracy is, and whether two variants really differ.

Every number of the results tables is a proportion of prompts (or test rows) with a 0/1 verdict, and the variants
of a cell answer the *same* prompts. So:
- one cell: a Wilson interval on the prompts (statsmodels `proportion_confint(method="wilson")`);
- several seeds of a grid point: a cluster bootstrap over prompts, each resampled prompt bringing its verdicts in
  every seed (the seeds share the prompts, so a prompt's verdicts are correlated across seeds; resampling
  verdicts one by one would make the interval too narrow). With the same prompts in every seed this is the
  ordinary bootstrap of the per-prompt means over seeds (scipy `bootstrap`, percentile, fixed seed);
- two variants: an exact McNemar test on the discordant prompts (statsmodels `mcnemar(exact=True)`: the binomial
  test of the prompts only A flags against those only B flags), and the paired difference with the same
  bootstrap over prompts (differences taken per prompt, so the pairing narrows the interval).
Over several seeds the McNemar test pools the prompt × seed pairs, i.e. treats them as independent; the
bootstrap interval of the difference does not, and is the one to read when they disagree.

Verdicts travel as strings of '0'/'1' (one character per prompt, in evaluation order): compact in rows.json.
Scores are percentages, as everywhere in the results.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
METHODS = {"cell": "Wilson on the prompts",
           "seeds": f"cluster bootstrap over prompts, resampled jointly across seeds ({N_RESAMPLES} resamples, "
                    f"percentile, seed {BOOTSTRAP_SEED})",
           "paired": f"bootstrap over prompts of the per-prompt difference ({N_RESAMPLES} resamples, percentile, "
                     f"seed {BOOTSTRAP_SEED}); p: exact McNemar on the discordant prompts (pooled over seeds)"}


def encode(flags: Sequence[bool]) -> str:
    """'0110…': one character per prompt."""
    return "".join("1" if f else "0" for f in flags)


def decode(verdicts: str) -> np.ndarray:
    return np.frombuffer(verdicts.encode("ascii"), dtype=np.uint8) - ord("0")


def matrix(verdicts: Sequence[str]) -> np.ndarray | None:
    """Seeds × prompts 0/1 matrix, or None when the seeds did not judge the same number of prompts."""
    if not verdicts or len({len(v) for v in verdicts}) != 1 or not verdicts[0]:
        return None
    return np.stack([decode(v) for v in verdicts]).astype(float)


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """95 % Wilson interval of k / n, in percent."""
    from statsmodels.stats.proportion import proportion_confint
    lo, hi = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    return 100 * float(lo), 100 * float(hi)


def _bootstrap_mean(x: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of x (one value per prompt)."""
    from scipy.stats import bootstrap
    if np.all(x == x[0]):  # every resample has the same mean (scipy would warn and return nan)
        return float(x[0]), float(x[0])
    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=N_RESAMPLES, method="percentile",
                    vectorized=True, rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def cluster_bootstrap(m: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of the mean of a seeds × prompts 0/1 matrix, prompts as clusters, in percent.

    Every verdict equal (no prompt ever flagged, say): every resample agrees, and a zero-width interval would
    claim certainty; the Wilson interval on the prompts (as if one seed) says how little 0 of n rules out."""
    if np.all(m == m.flat[0]):
        return wilson(int(m[0].sum()), m.shape[1], confidence)
    lo, hi = _bootstrap_mean(m.mean(axis=0), confidence)
    return 100 * lo, 100 * hi


def interval(verdicts: Sequence[str]) -> tuple[float, float] | None:
    """The interval of a score from its verdicts in each seed: Wilson for one seed, else the cluster bootstrap."""
    m = matrix(verdicts)
    if m is None:
        return None
    if m.shape[0] == 1:
        return wilson(int(m.sum()), m.shape[1])
    return cluster_bootstrap(m)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact McNemar p-value (two-sided) from the discordant counts: only A flags / only B flags."""
    from statsmodels.stats.contingency_tables import mcnemar
    # the concordant cells do not enter the exact test; 0 keeps the table valid
    return float(mcnemar([[0, a_only], [b_only, 0]], exact=True).pvalue)


def paired(a: Sequence[str], b: Sequence[str], confidence: float = CONFIDENCE) -> dict | None:
    """A vs B on the same prompts (and seeds, in the same order): difference A − B in points with its interval,
    the discordant counts and the exact McNemar p-value. None when the verdicts do not line up."""
    ma, mb = matrix(a), matrix(b)
    if ma is None or mb is None or ma.shape != mb.shape:
        return None
    d = ma - mb
    lo, hi = _bootstrap_mean(d.mean(axis=0), confidence)
    a_only, b_only = int((d > 0).sum()), int((d < 0).sum())
    return {"n_prompts": ma.shape[1], "n_seeds": ma.shape[0], "diff": 100 * float(d.mean()),
            "diff_lo": 100 * lo, "diff_hi": 100 * hi, "a_only": a_only, "b_only": b_only,
            "p_value": mcnemar_p(a_only, b_only)}
