"""Answer extraction, grading and metrics.

Extraction order for a model's completion (the first that matches wins):

1. the last ``\\boxed{...}`` (balanced braces), as MATH-style and R1-style models answer;
2. ``The answer is X`` / ``Final answer: X``;
3. GSM8K's ``#### X``;
4. the last number in the text.

Equivalence uses ``math-verify`` (``parse`` + ``verify``), not hand-written sympy; plain numbers are
compared numerically first (fast path; commas and a trailing ``.0`` do not matter).
"""

from __future__ import annotations

import logging
import re
from statistics import mean
from typing import Any

logging.getLogger("math_verify").setLevel(logging.ERROR)  # no warnings about disabled signal timeouts

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` with balanced braces."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def gsm8k_gold(solution: str) -> str:
    """The gold answer of a GSM8K solution: the number after ``####``."""
    if "####" not in solution:
        raise ValueError("GSM8K solution has no '####' answer line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed:
        return boxed
    m = list(re.finditer(r"(?:the (?:final )?answer is|final answer\s*[:=])\s*:?\s*\$?([^\n$]+)", text, re.I))
    if m:
        ans = m[-1].group(1).strip().rstrip(".").strip()
        num = re.search(_NUM, ans)
        return num.group(0).replace("$", "") if num and len(ans) > 24 else ans
    m = list(re.finditer(r"####\s*(" + _NUM + ")", text))
    if m:
        return m[-1].group(1).replace("$", "")
    nums = re.findall(_NUM, text)
    if nums:
        return nums[-1].replace("$", "").rstrip(".")
    return None


def _as_number(s: str) -> float | None:
    t = s.strip().strip("$").replace(",", "").replace("\\!", "")
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t)
    t = re.sub(r"\s*(?:dollars?|units?|cm|m|kg|%)$", "", t)
    try:
        return float(t)
    except ValueError:
        return None


def is_equivalent(pred: str | None, gold: str) -> bool:
    if pred is None or not pred.strip():
        return False
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    try:
        from math_verify import parse, verify

        g = parse(f"${gold}$", parsing_timeout=None)
        p = parse(f"${pred}$", parsing_timeout=None)
        if g and p:
            return bool(verify(g, p, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - an unparsable answer is simply not equivalent
        pass
    return pred.strip() == gold.strip()


def grade(text: str, gold: str) -> tuple[str | None, bool]:
    pred = extract_answer(text)
    return pred, is_equivalent(pred, gold)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def summarize(predictions: list[dict[str, Any]], *, wall_s: float, decode_s: float, peak_kv_bytes: int | None,
              base_mean_tokens: float | None = None) -> dict[str, Any]:
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
    }
    if base_mean_tokens:
        m["tokens_saved"] = 1.0 - m["mean_tokens"] / base_mean_tokens
    return m


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
    from math import comb

    by_id = {p["problem_id"]: bool(p["correct"]) for p in other}
    pairs = [(bool(r["correct"]), by_id[r["problem_id"]]) for r in reference if r["problem_id"] in by_id]
    lost = sum(1 for a, b in pairs if a and not b)
    gained = sum(1 for a, b in pairs if b and not a)
    n = lost + gained
    p = min(1.0, 2 * sum(comb(n, k) for k in range(min(lost, gained) + 1)) / 2**n) if n else 1.0
    return {"n_paired": len(pairs), "lost": lost, "gained": gained, "flip_p": p}
