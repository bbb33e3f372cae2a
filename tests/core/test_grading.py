"""Answer grading: real model outputs (``data/grading_cases.jsonl``), then targeted synthetic cases."""

import json
from collections import Counter
from pathlib import Path

import math_verify
import pytest
from math_verify.errors import TimeoutException
from sympy import SympifyError

from thinkpress.core import evaluation
from thinkpress.core.grading import extract_answer, grade, is_equivalent, normalize_answer

CASES_FILE = Path(__file__).parent / "data" / "grading_cases.jsonl"
CASES = [json.loads(line) for line in CASES_FILE.read_text().splitlines() if line.strip()]


def _squash(s):
    return None if s is None else "".join(s.split())


# ---------------------------------------------------------------------------------------------------------------------
# Real outputs of the embedded models; expected values decided by reading each completion.
# ---------------------------------------------------------------------------------------------------------------------


def test_real_cases_cover_models_datasets_and_truncation():
    by_source = Counter(c["source"] for c in CASES)
    assert len(CASES) >= 40
    assert {s.split("/")[0] for s in by_source} == {"qwen2.5-coder-0.5b", "smollm2-135m"}
    assert {s.split("/")[1] for s in by_source} == {"gsm8k", "math500", "arith"}
    assert sum(c["finish_reason"] == "length" for c in CASES) >= 5
    assert Counter(c["expected_correct"] for c in CASES).keys() == {True, False}


@pytest.mark.parametrize("case", CASES, ids=[f"{c['source']}:{c['problem_id']}" for c in CASES])
def test_real_model_output(case):
    pred, ok = grade(case["completion"], case["gold"], truncated=case["finish_reason"] == "length")
    assert (_squash(pred), ok) == (_squash(case["expected_pred"]), case["expected_correct"]), case["note"]


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic: numbers with units, currency, percent, separators (stripped by rule, no list of units)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pred",
    [
        ("The answer is 12 marbles.", "12"),
        ("\\boxed{12 marbles}", "12"),
        ("\\boxed{\\$12}", "12"),
        ("So she has 12.00", "12"),
        ("In total 1,200", "1200"),
        ("\\boxed{1,200}", "1200"),
        ("She pays $12.50", "12.5"),
        ("The discount is 12%", "12"),
        ("\\boxed{\\text{12 cm}}", "12"),
        ("#### 12", "12"),
        ("\\boxed{12\\text{ dollars}}", "12"),
        ("\\boxed{12 \\mathrm{cm}^2}", "12"),
        ("\\boxed{12\\%}", "12"),
        ("The final answer is $\\$12$.", "12"),
        ("\\boxed{1,\\!200}", "1200"),
        ("\\boxed{-\\$5}", "-5"),
        ("\\boxed{.5}", "0.5"),
        ("\\boxed{12 km/h}", "12"),
        ("\\boxed{12 \\text{ square feet}}", "12"),
    ],
)
def test_numbers_with_units_currency_and_separators(text, pred):
    assert grade(text, pred) == (pred, True)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("x^2+1", "1+x^2"),
        ("(5, \\infty)", "(5,\\infty)"),
        ("[-1, 2)", "[-1,2)"),
        ("\\text{(C)}", "\\text{(C)}"),
        ("10^{\\circ}", "10^\\circ"),
        ("137 \\frac{1}{2}", "137.5"),
    ],
)
def test_real_math_answers_stay_math_and_go_to_math_verify(pred, gold):
    assert normalize_answer(pred) == pred  # not turned into a number
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, not_gold",
    [("2\\sqrt{3}", "2"), ("2x", "2"), ("12 x", "12"), ("\\text{(C)}", "\\text{(D)}"), ("(3, 4)", "34"),
     ("1, 2, 3", "123"), ("12 marbles and 3 cats", "12"), ("x^2+1", "1")],
)
def test_math_with_a_leading_number_is_not_that_number(pred, not_gold):
    assert not is_equivalent(pred, not_gold)


@pytest.mark.parametrize(
    "pred, gold, ok",
    [("1,200", "1200", True), ("1,234,567.5", "1234567.5", True), ("(3, 4)", "(3,4)", True), ("(3, 4)", "34", False),
     ("1, 2, 3", "1,2,3", True), ("1, 2, 3", "123", False), ("1,2,3", "123", False), ("-2, 1", "-2,1", True),
     ("1,20", "120", False), ("12,000", "12", False)],
)
def test_tuples_and_lists_are_not_thousands(pred, gold, ok):
    assert is_equivalent(pred, gold) is ok


@pytest.mark.parametrize(
    "text, pred",
    [
        ("3 + 4 = 7, so 7 apples. Then 9 apples", "9"),
        ("We find the final answer by adding 3 and 4: 7", "7"),
        ("The answer is that she earns $18 every day.", "18"),
        ("The answer is: **18**", "18"),
        ("The answer is $\\$18$ per day.", "18"),
        ("So, the answer is $k=6$.", "k=6"),
        ("**Final Answer:** $\\frac{3}{4}$", "\\frac{3}{4}"),
        ("\\boxed{5} is wrong, redo.\n\\boxed{6}", "6"),
        ("\\boxed{} is where the answer goes: 8", "8"),
        ("5 - 3 = 2", "2"),
        ("no numbers here", None),
    ],
)
def test_extraction_order_and_fallback(text, pred):
    assert grade(text, "0")[0] == pred


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic: truncated completions (cut off by the token limit)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pred",
    [
        ("First 3 + 4 = 7, then 7 * 2 = 14", None),  # no explicit answer: the last number does not count
        ("So the answer is \\boxed{14}. Let me double-check: 7 * 2", "14"),  # explicit and complete
        ("The answer is 14.\nCheck: 7 * 2 = 1", "14"),
        ("#### 14\nThe", "14"),
        ("Thus \\boxed{12} ... wait, it is \\boxed{1", None),  # cut while writing the boxed answer
        ("The answer is 12", None),  # may have been 1250: runs into the cut
        ("#### 12", None),
    ],
)
def test_truncated_only_explicit_complete_answers(text, pred):
    assert grade(text, "14", truncated=True)[0] == pred
    assert grade(text, "14", truncated=True)[1] is (pred == "14")


def test_assignments_compare_by_value_and_grading_works_in_threads():
    from concurrent.futures import ThreadPoolExecutor

    assert is_equivalent("k=6", "6") and not is_equivalent("k=6", "1")
    texts = ["\\boxed{\\frac{25}{100}}", "The answer is $(3, \\frac{\\pi}{2})$.", "\\boxed{2\\sqrt{3}}"]
    golds = ["\\frac14", "\\left( 3, \\frac{\\pi}{2} \\right)", "\\sqrt{12}"]
    with ThreadPoolExecutor(3) as pool:  # math-verify runs without signal-based timeouts
        assert [ok for _, ok in pool.map(grade, texts, golds)] == [True, True, True]


def test_untruncated_falls_back_and_positional_calls_still_work():
    assert grade("First 3 + 4 = 7, then 7 * 2 = 14", "14") == ("14", True)
    assert grade("The answer is \\boxed{7}", "7") == ("7", True)
    assert extract_answer("blah\n#### 1,250") == "1,250"  # as written; grade normalizes
    assert evaluation.grade is grade and evaluation.is_equivalent is is_equivalent


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic: exception policy (only "cannot be shown equal" failures mean not equivalent)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [SympifyError("bad"), TypeError("cannot determine truth value of Relational"),
                                   ValueError("bad"), NotImplementedError(), RecursionError(),
                                   TimeoutException("slow")])
def test_verify_failures_mean_not_equivalent(monkeypatch, error):
    def fail(*a, **k):
        raise error

    monkeypatch.setattr(math_verify, "verify", fail)
    assert is_equivalent("\\frac{1}{3}", "\\frac{2}{7}") is False
    assert is_equivalent("12", "12.0")  # numbers never reach math-verify


@pytest.mark.parametrize("error", [SympifyError("bad"), TimeoutException("slow"), ValueError("unparsable")])
def test_parse_errors_mean_not_equivalent(monkeypatch, error):
    def fail(*a, **k):
        raise error

    monkeypatch.setattr(math_verify, "parse", fail)
    assert is_equivalent("\\frac{1}{3}", "\\frac{2}{7}") is False


@pytest.mark.parametrize("name", ["parse", "verify"])
@pytest.mark.parametrize("error", [RuntimeError("bug"), AttributeError("bug"), KeyError("bug")])
def test_other_errors_propagate(monkeypatch, name, error):
    def fail(*a, **k):
        raise error

    monkeypatch.setattr(math_verify, name, fail)
    with pytest.raises(type(error)):
        is_equivalent("\\frac{1}{3}", "\\frac{2}{7}")


def test_signal_timeout_error_propagates(monkeypatch):
    def fail(*a, **k):
        raise ValueError("signal only works in main thread of the main interpreter")

    monkeypatch.setattr(math_verify, "verify", fail)
    with pytest.raises(ValueError, match="signal"):
        is_equivalent("\\frac{1}{3}", "\\frac{2}{7}")


def test_unparsable_answers_are_not_equivalent_without_raising():
    assert is_equivalent("\\frac{1}{", "\\frac{1}{2}") is False
    assert is_equivalent("}{", "3") is False
    assert is_equivalent("", "3") is False and is_equivalent(None, "3") is False
