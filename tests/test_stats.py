"""The statistics behind every reported comparison: CI coverage on known distributions, verdicts, seeds."""
import numpy as np
import pytest

from refinery.evaluation.stats import (
    IMPROVED,
    NO_CHANGE,
    WORSE,
    bootstrap_mean,
    mean_of_task_means,
    paired_difference,
    paired_ratio_of_means,
    slope,
    win_rate,
    within_group_slope,
)


def test_paired_bootstrap_ci_covers_the_true_difference_about_95_percent():
    """200 experiments of n=50 paired examples with a true mean difference of 0.3: the 95% CI must contain
    0.3 in about 95% of them (percentile bootstrap runs a little narrow at n=50; 0.90-0.99 accepted)."""
    rng = np.random.default_rng(1)
    hits = 0
    for i in range(200):
        before = rng.normal(0.0, 1.0, 50)
        after = before + rng.normal(0.3, 1.0, 50)
        e = paired_difference(before, after, seed=i, resamples=1000)
        hits += e.ci_low <= 0.3 <= e.ci_high
    assert 0.90 <= hits / 200 <= 0.99


def test_win_rate_ci_coverage_on_a_known_rate():
    """Bernoulli(0.65) wins, n=60: the CI of the win rate contains 0.65 about 95% of the time."""
    rng = np.random.default_rng(2)
    hits = 0
    for i in range(200):
        wins = rng.random(60) < 0.65
        e = win_rate(wins.astype(float), np.zeros(60) + 0.5, seed=i, resamples=1000)
        hits += e.ci_low <= 0.65 <= e.ci_high
    assert 0.90 <= hits / 200 <= 0.99


def test_verdicts():
    up = paired_difference(np.zeros(80), np.full(80, 0.2) + np.linspace(-0.05, 0.05, 80))
    assert up.verdict == IMPROVED and up.ci_low > 0 and up.n == 80
    down = paired_difference(np.zeros(80), -np.full(80, 0.2) + np.linspace(-0.05, 0.05, 80))
    assert down.verdict == WORSE
    flat = paired_difference(np.zeros(80), np.linspace(-1, 1, 80))
    assert flat.verdict == NO_CHANGE and flat.ci_low < 0 < flat.ci_high
    # lower is better (a loss): a fall is an improvement
    assert paired_difference(np.ones(50), np.ones(50) * 0.5 + np.linspace(0, 0.1, 50),
                             higher_is_better=False).verdict == IMPROVED


def test_win_rate_ties_count_half_and_null_is_one_half():
    e = win_rate([1, 1, 0, 2], [0, 1, 1, 2])
    assert e.estimate == pytest.approx((1 + 0.5 + 0 + 0.5) / 4) and e.null == 0.5
    assert win_rate(np.ones(60), np.zeros(60)).verdict == IMPROVED
    assert win_rate(np.zeros(60), np.zeros(60)).verdict == NO_CHANGE


def test_win_rate_over_k_sampled_answers_is_the_share_of_answer_pairs_won_per_prompt():
    # prompt 1: policy answers (3, 1) against baseline (2, 2): pairs won 1, 0, 1, 0 -> 0.5
    # prompt 2: (5, 5) against (5, 0): a tie, a win, a tie, a win -> 0.75
    e = win_rate([[3, 1], [5, 5]], [[2, 2], [5, 0]])
    assert e.n == 2 and e.estimate == pytest.approx((0.5 + 0.75) / 2)
    # one answer per prompt as a column is the plain win rate
    assert win_rate([[1], [0]], [[0], [1]]).estimate == win_rate([1, 0], [0, 1]).estimate
    with pytest.raises(ValueError, match="one shape"):
        win_rate([[1, 2]], [[1]])


def test_same_seed_same_interval_and_golden_values():
    x = np.random.default_rng(3).normal(0.1, 1.0, 64)
    a, b = bootstrap_mean(x, seed=7), bootstrap_mean(x, seed=7)
    assert a == b
    # golden: numpy's PCG64 stream is stable across versions for integers()
    assert (a.estimate, round(a.ci_low, 4), round(a.ci_high, 4)) == pytest.approx((float(x.mean()), -0.1966, 0.3191),
                                                                               abs=2e-4)


def test_ratio_of_means_is_relative_change():
    before, after = np.full(50, 2.0), np.full(50, 1.8)
    e = paired_ratio_of_means(before, after, weights=np.arange(1, 51))
    assert e.estimate == pytest.approx(-0.1) and e.verdict == IMPROVED  # loss down 10%: lower is better


def test_slope_ci():
    rng = np.random.default_rng(4)
    rising = 0.05 * np.arange(20) + rng.normal(0, 0.05, 20)
    e = slope(rising)
    assert e.estimate == pytest.approx(0.05, abs=0.01) and e.verdict == IMPROVED
    assert slope(rng.normal(0, 1, 20)).verdict == NO_CHANGE
    with pytest.raises(ValueError):
        slope([1.0, 2.0])


def _ppo_like_episodes(rng, true_slope: float, steps: int = 24, batch: int = 8, prompts: int = 50):
    """Episodes drawn as PPO draws prompts (a fresh permutation each pass), each prompt with its own level
    (two tasks ~2 points apart, as the demo's RM scores are) plus a common trend and noise."""
    level = np.where(np.arange(prompts) % 2 == 0, -0.5, 1.5) + rng.normal(0, 0.5, prompts)
    order, eps = [], []
    for step in range(1, steps + 1):
        for _ in range(batch):
            if not order:
                order = list(rng.permutation(prompts))
            p = order.pop()
            eps.append((p, step, level[p] + true_slope * step + rng.normal(0, 0.3)))
    return eps


def test_within_prompt_slope_covers_the_truth_and_sees_what_step_means_miss():
    rng = np.random.default_rng(11)
    hits, found, found_by_means = 0, 0, 0
    for _ in range(40):
        eps = _ppo_like_episodes(rng, 0.02)
        g, x, y = zip(*eps)
        e = within_group_slope(g, x, y, seed=0, resamples=400)
        hits += e.ci_low <= 0.02 <= e.ci_high
        found += e.verdict == IMPROVED
        means = [np.mean([s for _, st, s in eps if st == k]) for k in range(1, 25)]
        found_by_means += slope(means, resamples=400).verdict == IMPROVED
    assert hits >= 34  # ~95% coverage (40 trials)
    assert found >= 36 and found_by_means <= 30  # the prompt mix hides a trend the within-prompt slope finds
    flat = _ppo_like_episodes(rng, 0.0)
    assert within_group_slope(*zip(*flat), seed=0).verdict == NO_CHANGE
    with pytest.raises(ValueError):
        within_group_slope(["a", "b"], [1, 2], [0.0, 1.0])


def test_mean_of_task_means_and_paired_difference_to_a_baseline():
    rng = np.random.default_rng(5)
    a = {"t1": rng.normal(0.5, 0.1, 64), "t2": rng.normal(0.2, 0.1, 64)}
    e = mean_of_task_means(a)
    assert e.n == 128 and e.estimate == pytest.approx((a["t1"].mean() + a["t2"].mean()) / 2)
    assert e.ci_low < e.estimate < e.ci_high and e.ci_high - e.ci_low < 0.05
    better = {t: v + 0.05 for t, v in a.items()}
    assert mean_of_task_means(better, a).verdict == IMPROVED  # the same examples, all shifted: a sure gain
    noise = {t: v + rng.normal(0, 0.2, 64) for t, v in a.items()}
    assert mean_of_task_means(noise, a).verdict == NO_CHANGE
