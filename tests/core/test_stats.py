"""Intervals and tests behind every reported figure, checked against textbook values and brute force."""

import itertools
from math import comb

import numpy as np
import pytest

from thinkpress.core.evaluation import with_intervals
from thinkpress.core.report import summary_lines
from thinkpress.core.stats import (
    bootstrap_mean,
    excludes_zero,
    mcnemar_exact,
    paired_difference,
    paired_savings,
    wilson,
)


def test_wilson_matches_the_closed_form_and_known_values():
    # Newcombe (1998), table I: 81 of 263 -> 0.2553 to 0.3662; 15 of 148 -> 0.0624 to 0.1605
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-4)
    assert wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=5e-4)  # no zero-width interval at 0 of 10
    assert wilson(10, 10)[1] == 1.0 and wilson(10, 10)[0] == pytest.approx(0.7225, abs=5e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_is_the_two_sided_binomial_sign_test():
    for lost, gained in itertools.product(range(7), range(7)):
        n = lost + gained
        if n == 0:
            assert mcnemar_exact(0, 0) == 1.0
            continue
        # brute force: probability of a split at least as uneven as observed under p = 1/2, both tails
        observed = abs(lost - gained)
        p = sum(comb(n, k) for k in range(n + 1) if abs(2 * k - n) >= observed) / 2**n
        assert mcnemar_exact(lost, gained) == pytest.approx(min(1.0, p))
    assert mcnemar_exact(38, 12) < 0.01


def test_bootstrap_intervals_are_seeded_and_cover_the_truth():
    rng = np.random.default_rng(1)
    x = list(rng.normal(100, 20, size=400))
    lo, hi = bootstrap_mean(x, seed=3)
    assert bootstrap_mean(x, seed=3) == (lo, hi) and bootstrap_mean(x, seed=4) != (lo, hi)
    se = np.std(x, ddof=1) / np.sqrt(len(x))
    assert lo < np.mean(x) < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_mean([5.0]) is None

    # a paired 30% cut: the interval contains 0.30 and excludes 0
    ref = list(rng.integers(100, 400, size=200).astype(float))
    cut = [0.7 * t + rng.normal(0, 10) for t in ref]
    s = paired_savings(ref, cut)
    assert s[0] < 0.30 < s[1] and excludes_zero(s)
    # pairing matters: the same change with the problems shuffled has a much wider interval
    wide = paired_difference(ref, list(rng.permutation(ref)))
    tight = paired_difference(ref, [t + 1.0 for t in ref])
    assert tight == pytest.approx((1.0, 1.0)) and not excludes_zero(wide)
    with pytest.raises(ValueError):
        paired_savings([1.0, 2.0], [1.0])


def _recs(correct, tokens):
    return [{"problem_id": str(i), "correct": c, "n_tokens": t}
            for i, (c, t) in enumerate(zip(correct, tokens, strict=True))]


def test_with_intervals_pairs_by_problem_and_summary_says_no_significant_change_in_words():
    base = _recs([1, 1, 0, 1, 0, 1, 1, 0, 1, 0] * 3, [200] * 30)
    same_acc = _recs([1, 0, 1, 1, 0, 1, 1, 0, 0, 1] * 3, [100] * 30)  # 6 lost, 6 gained, half the tokens
    m = with_intervals(same_acc, base=base, reference=base)
    assert m["tokens_saved"] == 0.5 and m["tokens_saved_ci"] == pytest.approx([0.5, 0.5])
    assert m["accuracy_delta"] == 0.0 and m["accuracy_delta_ci"][0] < 0 < m["accuracy_delta_ci"][1]
    assert m["accuracy_ci"] == pytest.approx(list(wilson(18, 30)))
    # the pairing is by problem id, not by position
    shuffled = list(reversed(same_acc))
    assert with_intervals(shuffled, base=base, reference=base)["accuracy_delta"] == 0.0

    rows = [{"name": "base", "n": 30, "accuracy": 0.6, "mean_tokens": 200.0},
            {"name": "trained", "n": 30, "accuracy": 0.6, "mean_tokens": 100.0, "flips_vs": "base", "lost": 6,
             "gained": 6, "flip_p": 1.0, "truncation_rate": 0.1, **m}]
    (line,) = summary_lines("gsm8k", rows)
    assert "no significant change" in line and "50.0% fewer" in line and "significant" in line.split("fewer")[1]
    assert "6 lost / 6 gained" in line and "Cut off at the token limit: 10.0%" in line
