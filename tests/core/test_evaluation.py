import pytest

from thinkpress.core.evaluation import (
    extract_answer,
    grade,
    is_equivalent,
    last_boxed,
    paired_flips,
    percentile,
    summarize,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("Nested \\boxed{\\sqrt{x^{2}}} end", "\\sqrt{x^{2}}"),
        ("Step 1: 3+4=7.\nThe answer is 12.", "12"),
        ("blah\n#### 1,250", "1,250"),
        ("We get 5 apples, then 9 apples", "9"),
        ("no numbers", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_unbalanced_boxed_falls_back():
    assert last_boxed("\\boxed{12") is None
    assert extract_answer("\\boxed{12") == "12"


@pytest.mark.parametrize(
    "pred, gold, ok",
    [("1,000", "1000", True), ("18.0", "18", True), ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "\\frac34", True),
     ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True), ("17", "18", False), (None, "1", False),
     ("x+1", "1+x", True)],
)
def test_equivalence(pred, gold, ok):
    assert is_equivalent(pred, gold) is ok


def test_grade_and_summary_by_hand():
    preds = [
        {"n_tokens": 10, "correct": True, "finish_reason": "eos"},
        {"n_tokens": 30, "correct": False, "finish_reason": "length"},
        {"n_tokens": 20, "correct": True, "finish_reason": "eos"},
        {"n_tokens": 40, "correct": False, "finish_reason": "eos"},
    ]
    m = summarize(preds, wall_s=8.0, decode_s=2.0, peak_kv_bytes=123)
    assert m["accuracy"] == 0.5 and m["mean_tokens"] == 25 and m["mean_tokens_correct"] == 15
    assert m["p50_tokens"] == 25 and m["p90_tokens"] == pytest.approx(37.0)
    assert m["truncation_rate"] == 0.25 and m["latency_s"] == 2.0 and m["decode_tokens_per_s"] == 50.0
    assert m["peak_kv_bytes"] == 123
    assert grade("The answer is \\boxed{7}", "7") == ("7", True)
    assert percentile([], 0.5) == 0.0


def test_paired_flips_counts_changed_problems_and_the_exact_mcnemar_p():
    ref = [{"problem_id": str(i), "correct": i < 8} for i in range(10)]  # 8 right
    # six of the reference's right answers turn wrong, none the other way; one id is missing from `other`
    other = [{"problem_id": str(i), "correct": i >= 6 and i < 8} for i in range(9)]
    m = paired_flips(ref, other)
    assert (m["n_paired"], m["lost"], m["gained"]) == (9, 6, 0)
    assert m["flip_p"] == pytest.approx(2 / 2**6)  # both tails of Binomial(6, 1/2) at the extreme: 2 * 1/64
    # one lost, one gained: a perfectly even split, p = 1
    even = paired_flips(ref[:4] + [{"problem_id": "9", "correct": False}],
                        [{"problem_id": "0", "correct": False}, {"problem_id": "9", "correct": True}])
    assert (even["lost"], even["gained"], even["flip_p"]) == (1, 1, 1.0)
    # 1 lost vs 5 gained: P(X <= 1) = 7/64 per tail
    skew = paired_flips([{"problem_id": str(i), "correct": i == 0} for i in range(6)],
                        [{"problem_id": str(i), "correct": i > 0} for i in range(6)])
    assert (skew["lost"], skew["gained"]) == (1, 5) and skew["flip_p"] == pytest.approx(14 / 64)
    assert paired_flips(ref, ref)["flip_p"] == 1.0
