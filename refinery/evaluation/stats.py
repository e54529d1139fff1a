"""Statistics every comparison the pipeline reports goes through: n, a point estimate, a 95% confidence
interval from a seeded bootstrap over examples, and a verdict.

Why a percentile bootstrap: the quantities compared (ROUGE-L, exact match, win indicators, per-document
losses) are bounded, skewed or discrete, so a normal approximation is poor at n ~ 50; resampling the
examples (paired: the same examples for both sides) makes no such assumption and is what reviewers of
model comparisons expect. The resampling is vectorised (one (B, n) index draw), so 2,000 resamples of a few
hundred examples cost milliseconds.

Verdicts: `improved` when the CI of (after - before) lies above 0 (for a higher-is-better quantity),
`worse` when it lies below 0, `no significant change` when it contains 0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000

IMPROVED, NO_CHANGE, WORSE = "improved", "no significant change", "worse"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its CI; `verdict` compares the CI with `null` (0 for differences, 0.5 for a
    win rate)."""

    n: int
    estimate: float
    ci_low: float
    ci_high: float
    verdict: str
    null: float = 0.0

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def text(self, digits: int = 3) -> str:
        return (f"{self.estimate:+.{digits}f} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}] "
                f"(n={self.n}, {self.verdict})")


def verdict(low: float, high: float, null: float = 0.0, higher_is_better: bool = True) -> str:
    if low > null:
        return IMPROVED if higher_is_better else WORSE
    if high < null:
        return WORSE if higher_is_better else IMPROVED
    return NO_CHANGE


def _percentile_ci(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_mean(values: Sequence[float], *, null: float = 0.0, higher_is_better: bool = True,
                   seed: int = 0, resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> Estimate:
    """Mean of `values` with a percentile-bootstrap CI over the examples (e.g. win indicators against
    null=0.5, or per-example differences against 0)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_mean: no values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    lo, hi = _percentile_ci(x[idx].mean(axis=1), confidence)
    return Estimate(int(x.size), float(x.mean()), lo, hi, verdict(lo, hi, null, higher_is_better), null)


def paired_difference(before: Sequence[float], after: Sequence[float], *, higher_is_better: bool = True,
                      seed: int = 0, resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> Estimate:
    """mean(after - before) over the same examples, with a paired bootstrap CI."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} 'after' values for {b.size} 'before' values")
    return bootstrap_mean(a - b, null=0.0, higher_is_better=higher_is_better, seed=seed, resamples=resamples,
                          confidence=confidence)


def mean_of_task_means(per_task: dict[str, Sequence[float]], baseline: dict[str, Sequence[float]] | None = None, *,
                       seed: int = 0, resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> Estimate:
    """The mean over tasks of each task's mean (what SFT's `mean_score` is), or with `baseline` the mean over
    tasks of each task's paired mean difference, with a bootstrap CI that resamples examples within each task
    (tasks are fixed, their examples are the sample). n = examples over all tasks."""
    tasks = sorted(per_task)
    if not tasks:
        raise ValueError("mean_of_task_means: no tasks")
    rng = np.random.default_rng(seed)
    point, boot, n = 0.0, np.zeros(resamples), 0
    for t in tasks:
        x = np.asarray(per_task[t], dtype=np.float64)
        if baseline is not None:
            b = np.asarray(baseline[t], dtype=np.float64)
            if b.shape != x.shape:
                raise ValueError(f"mean_of_task_means: task {t}: {x.size} values against {b.size}")
            x = x - b
        idx = rng.integers(0, x.size, size=(resamples, x.size))
        point += x.mean() / len(tasks)
        boot += x[idx].mean(axis=1) / len(tasks)
        n += x.size
    lo, hi = _percentile_ci(boot, confidence)
    return Estimate(n, float(point), lo, hi, verdict(lo, hi) if baseline is not None else "", 0.0)


def paired_ratio_of_means(before: Sequence[float], after: Sequence[float], weights: Sequence[float] | None = None,
                          *, higher_is_better: bool = False, seed: int = 0, resamples: int = RESAMPLES,
                          confidence: float = CONFIDENCE) -> Estimate:
    """(weighted mean of after) / (weighted mean of before) - 1 with a paired bootstrap CI: e.g. the relative
    change of a token-weighted loss over the same documents. `null` is 0 (no change)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, b.size, size=(resamples, b.size))
    ratios = (a[idx] * w[idx]).sum(1) / (b[idx] * w[idx]).sum(1) - 1
    lo, hi = _percentile_ci(ratios, confidence)
    point = float((a * w).sum() / (b * w).sum() - 1)
    return Estimate(int(b.size), point, lo, hi, verdict(lo, hi, 0.0, higher_is_better))


def win_rate(policy_scores: Sequence[float], baseline_scores: Sequence[float], *, seed: int = 0,
             resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> Estimate:
    """Share of examples where the policy scores higher (ties count 1/2), with a bootstrap CI over examples,
    judged against 0.5 (no preference). Scores may be [n] (one answer per example) or [n, k] (k sampled answers
    per example from each side): an example's win is then the share of its k x k answer pairs the policy wins,
    the probability that a policy answer beats a baseline answer for that prompt; the bootstrap still resamples
    examples, the independent unit."""
    p, q = np.asarray(policy_scores, dtype=np.float64), np.asarray(baseline_scores, dtype=np.float64)
    if p.shape != q.shape or p.ndim not in (1, 2):
        raise ValueError(f"win_rate: scores must be [n] or [n, k] of one shape, got {p.shape} and {q.shape}")
    if p.ndim == 1:
        p, q = p[:, None], q[:, None]
    a, b = p[:, :, None], q[:, None, :]
    wins = ((a > b) + 0.5 * (a == b)).mean(axis=(1, 2))
    return bootstrap_mean(wins, null=0.5, seed=seed, resamples=resamples, confidence=confidence)


def within_group_slope(groups: Sequence, xs: Sequence[float], ys: Sequence[float], *, seed: int = 0,
                       resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> Estimate:
    """Slope of y on x within groups (the fixed-effects estimator: each group's own mean removed from x and y,
    then one least-squares slope), with a cluster bootstrap over groups; n = groups that contribute (seen at
    two or more x values). For PPO's training reward per prompt and step: a step's mean reward mixes whichever
    prompts it drew (two tasks whose RM scores sit ~2 points apart), so the slope of step means is mostly
    prompt-mix noise; within a prompt, what changes between its visits is the policy."""
    g = np.asarray([str(v) for v in groups])
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    parts = []
    for key in np.unique(g):
        sel = g == key
        xc = x[sel] - x[sel].mean()
        if (xc ** 2).sum() > 0:
            parts.append(((xc * (y[sel] - y[sel].mean())).sum(), (xc ** 2).sum()))
    if len(parts) < 3:
        raise ValueError("within_group_slope: needs at least 3 groups seen at two or more x values")
    num, den = np.array(parts).T
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(parts), size=(resamples, len(parts)))
    slopes = num[pick].sum(1) / den[pick].sum(1)
    lo, hi = _percentile_ci(slopes, confidence)
    return Estimate(len(parts), float(num.sum() / den.sum()), lo, hi, verdict(lo, hi))


def slope(values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES,
          confidence: float = CONFIDENCE) -> Estimate:
    """Least-squares slope of `values` against their index (e.g. training reward per PPO step), with a
    bootstrap CI over (step, value) pairs; `improved` when the CI lies above 0."""
    y = np.asarray(values, dtype=np.float64)
    if y.size < 3:
        raise ValueError("slope: needs at least 3 points")
    x = np.arange(y.size, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, y.size, size=(resamples, y.size))
    xs, ys = x[idx], y[idx]
    xc = xs - xs.mean(1, keepdims=True)
    denom = (xc ** 2).sum(1)
    ok = denom > 0  # a resample of one repeated step has no slope
    slopes = (xc * (ys - ys.mean(1, keepdims=True))).sum(1)[ok] / denom[ok]
    lo, hi = _percentile_ci(slopes, confidence)
    point = float(np.polyfit(x, y, 1)[0])
    return Estimate(int(y.size), point, lo, hi, verdict(lo, hi))
