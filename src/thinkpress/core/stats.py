"""Uncertainty for every figure a report prints.

* accuracy: Wilson score interval (95%), which stays inside [0, 1] and is honest at small n and at
  accuracies near 0 or 1 (the normal approximation is not);
* paired differences between two variants on the same problems (token savings, accuracy change):
  percentile bootstrap over problems, resampling the *pairs* so that the per-problem correlation
  is kept; seeded, so the same predictions always give the same interval;
* lost / gained problems: the exact two-sided McNemar (sign) test.

A difference whose interval contains 0 is reported in words as "no significant change".
"""

from __future__ import annotations

from math import comb, sqrt

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends, not rounding residue


def mcnemar_exact(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value: how likely a split at least this uneven is under equal accuracy."""
    n = lost + gained
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, k) for k in range(min(lost, gained) + 1)) / 2**n)


def _resample(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(stats: np.ndarray) -> tuple[float, float] | None:
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return None
    return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def _pairs(ref: list[float], other: list[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(ref) != len(other):
        raise ValueError("a paired interval needs one value per problem in both lists")
    return np.asarray(ref, dtype=float), np.asarray(other, dtype=float)


def bootstrap_mean(values: list[float], *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of the mean (None for fewer than two values)."""
    if len(values) < 2:
        return None
    x = np.asarray(values, dtype=float)
    return _interval(x[_resample(len(x), n_boot, seed)].mean(axis=1))


def paired_savings(ref_tokens: list[float], tokens: list[float], *, n_boot: int = 2000,
                   seed: int = 0) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of ``1 - mean(tokens) / mean(ref_tokens)`` (same problems, same order)."""
    a, b = _pairs(ref_tokens, tokens)
    if len(a) < 2:
        return None
    idx = _resample(len(a), n_boot, seed)
    ref_means = a[idx].mean(axis=1)
    return _interval(1.0 - b[idx].mean(axis=1) / np.where(ref_means > 0, ref_means, np.nan))


def paired_difference(ref: list[float], other: list[float], *, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of ``mean(other) - mean(ref)`` (e.g. accuracy change, 0/1 values)."""
    a, b = _pairs(ref, other)
    if len(a) < 2:
        return None
    return _interval((b - a)[_resample(len(a), n_boot, seed)].mean(axis=1))


def excludes_zero(ci: tuple[float, float] | list[float] | None) -> bool:
    """True when an interval lies entirely on one side of 0 (a significant change at its level)."""
    return ci is not None and (ci[0] > 0 or ci[1] < 0)
