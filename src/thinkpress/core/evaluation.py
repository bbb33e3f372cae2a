"""Metrics of evaluation runs. Answer grading is in :mod:`thinkpress.core.grading` (re-exported here)."""

from __future__ import annotations

from statistics import mean
from typing import Any

from thinkpress.core.grading import extract_answer, grade, gsm8k_gold, is_equivalent, last_boxed  # noqa: F401


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def _mean_or_none(xs: list[float | None]) -> float | None:
    return mean(xs) if xs and all(x is not None for x in xs) else None


def summarize(predictions: list[dict[str, Any]], *, wall_s: float, decode_s: float,
              peak_kv_bytes: int | None) -> dict[str, Any]:
    """Metrics of one evaluation variant from its prediction records."""
    n = len(predictions)
    toks = [p["n_tokens"] for p in predictions]
    correct = [p["n_tokens"] for p in predictions if p["correct"]]
    gen = sum(toks)
    m = {
        "n": n,
        "accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0,
        "mean_tokens": mean(toks) if toks else 0.0,
        "mean_tokens_correct": mean(correct) if correct else None,
        "p50_tokens": percentile(toks, 0.5),
        "p90_tokens": percentile(toks, 0.9),
        "p50_tokens_correct": percentile(correct, 0.5) if correct else None,
        "p90_tokens_correct": percentile(correct, 0.9) if correct else None,
        "truncation_rate": sum(p["finish_reason"] == "length" for p in predictions) / n if n else 0.0,
        "latency_s": wall_s / n if n else 0.0,
        "decode_tokens_per_s": gen / decode_s if decode_s > 0 else 0.0,
        "peak_kv_bytes": peak_kv_bytes,
        "kv_evicted": round(sum(p.get("kv_evicted", 0.0) for p in predictions)),
        # the share of its own full cache an answer kept (at its widest, and step-averaged), averaged over
        # answers; None when any answer was decoded by an engine that does not count
        "kv_kept_peak": _mean_or_none([p.get("kv_kept_peak") for p in predictions]),
        "kv_kept_mean": _mean_or_none([p.get("kv_kept_mean") for p in predictions]),
        # one count, or None when unrecorded or mixed (a resumed run on another machine): speeds compare only
        # between variants timed at the same count
        "threads": threads.pop() if len(threads := {p.get("threads") for p in predictions}) == 1 else None,
    }
    return m


def _paired(reference: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    by_id = {p["problem_id"]: p for p in other}
    return [(r, by_id[r["problem_id"]]) for r in reference if r["problem_id"] in by_id]


def with_intervals(predictions: list[dict[str, Any]], *, base: list[dict[str, Any]] | None = None,
                   reference: list[dict[str, Any]] | None = None, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """95% intervals of one variant's figures (see :mod:`thinkpress.core.stats`).

    ``accuracy_ci`` (Wilson) and ``mean_tokens_ci`` (bootstrap) always; against ``base`` (paired by
    problem): ``tokens_saved`` = 1 - mean tokens / base mean tokens and its paired-bootstrap
    ``tokens_saved_ci``; against ``reference`` (base, or for a KV variant the same model with the full
    cache): ``accuracy_delta`` and its paired-bootstrap ``accuracy_delta_ci``.
    """
    from thinkpress.core.stats import bootstrap_mean, paired_difference, paired_savings, wilson

    n = len(predictions)
    out: dict[str, Any] = {
        "accuracy_ci": list(wilson(sum(bool(p["correct"]) for p in predictions), n)),
        "mean_tokens_ci": _as_list(bootstrap_mean([p["n_tokens"] for p in predictions], n_boot=n_boot, seed=seed)),
    }
    if base is not None:
        pairs = _paired(base, predictions)
        ref_t, t = [r["n_tokens"] for r, _ in pairs], [o["n_tokens"] for _, o in pairs]
        if pairs and sum(ref_t):
            out["tokens_saved"] = 1.0 - mean(t) / mean(ref_t)
            out["tokens_saved_ci"] = _as_list(paired_savings(ref_t, t, n_boot=n_boot, seed=seed))
    if reference is not None:
        pairs = _paired(reference, predictions)
        if pairs:
            a = [float(bool(r["correct"])) for r, _ in pairs]
            b = [float(bool(o["correct"])) for _, o in pairs]
            out["accuracy_delta"] = mean(b) - mean(a)
            out["accuracy_delta_ci"] = _as_list(paired_difference(a, b, n_boot=n_boot, seed=seed))
    return out


def _as_list(ci: tuple[float, float] | None) -> list[float] | None:
    return list(ci) if ci is not None else None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def kv_agreement(full: list[dict[str, Any]], pruned: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of pruned-cache outputs with the full-cache ones, on the full-cache answers that ended with EOS.

    ``token_agreement``: mean share of each full-cache output reproduced before the first differing
    token (after a difference greedy outputs are not comparable position by position);
    ``exact_match``: share of identical outputs. Pairs by ``problem_id``.
    """
    by_id = {p["problem_id"]: p for p in pruned}
    pairs = [(f, by_id[f["problem_id"]]) for f in full
             if f["finish_reason"] == "eos" and f.get("token_ids") and f["problem_id"] in by_id
             and by_id[f["problem_id"]].get("token_ids") is not None]
    if not pairs:
        return {"n_agreement": 0, "token_agreement": None, "exact_match": None}
    return {
        "n_agreement": len(pairs),
        "token_agreement": mean(common_prefix(f["token_ids"], p["token_ids"]) / len(f["token_ids"]) for f, p in pairs),
        "exact_match": mean(float(f["token_ids"] == p["token_ids"]) for f, p in pairs),
    }


def paired_flips(reference: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-problem correctness of ``other`` against ``reference``, paired by ``problem_id``.

    ``lost``: right in the reference, wrong in ``other``; ``gained``: the reverse; ``flip_p``: the exact
    two-sided McNemar (sign) test of lost vs. gained, i.e. how likely a split at least this uneven is
    when the two variants are equally accurate. On a few dozen problems an accuracy difference of one
    or two problems is noise, and this says so.
    """
    from thinkpress.core.stats import mcnemar_exact

    pairs = [(bool(r["correct"]), bool(o["correct"])) for r, o in _paired(reference, other)]
    lost = sum(1 for a, b in pairs if a and not b)
    gained = sum(1 for a, b in pairs if b and not a)
    return {"n_paired": len(pairs), "lost": lost, "gained": gained, "flip_p": mcnemar_exact(lost, gained)}
