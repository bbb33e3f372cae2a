r"""Answer extraction and grading.

Extraction (``extract_answer``); the first rule that matches wins:

1. the last non-empty ``\boxed{...}`` / ``\fbox{...}`` with balanced braces;
2. the last ``The (final) answer is X`` / ``Final answer: X``; X ends at the end of its line or sentence;
3. the last GSM8K-style ``#### X``;
4. the last number in the text.

A completion cut off by the token limit (``truncated=True``) is never credited through rule 4: only an
explicit answer (1-3) it already contains counts, and for 2-3 only one followed by the end of a
sentence or line (so ``#### 12`` cut from ``#### 1250`` does not count); a ``\boxed{`` left open by the cut
means no answer.

Normalization (``normalize_answer``), by rule rather than by a list of units: math delimiters and a
final period are dropped, and an answer that is one number with only currency (``$``, ``\$``), a percent
sign and words around it (``12 marbles``, ``\$12``, ``12\text{ dollars}``, ``12 \mathrm{cm}^2``,
``\text{12 cm}``) is that number, written canonically (``1,200`` -> ``1200``, ``12.50`` -> ``12.5``).
A comma is a thousands separator only before groups of exactly three digits with no space: ``1,200``
is a number, ``(3, 4)`` and ``1, 2, 3`` are not. Bare words need two or more letters and a space
before them, so ``2x`` stays math. Anything else (``\frac{1}{2}``, ``2\sqrt{3}``, tuples, intervals,
``\text{(C)}``, ``10^{\circ}``) stays LaTeX.

Equivalence (``is_equivalent``): two numbers compare numerically (relative tolerance 1e-6); otherwise
math-verify (``parse`` + ``verify``, no signal-based timeouts, so it works in threads) decides, with
whitespace-insensitive string equality as the last resort. Only the failures that mean "not
equivalent" (parse and sympy errors, math-verify timeouts) are caught; anything else raises.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal
from itertools import product

logging.getLogger("math_verify").setLevel(logging.ERROR)  # no warnings about disabled signal timeouts

# a number: thousands groups (1,200 / 1,234.5), plain (1200 / 12.50) or a bare fraction part (.35)
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]*\d)|\d+(?:\.\d+)?|\.\d+"
# a number standing alone in running text (not part of a word, a version or a list like 1,2,3)
_TEXT_NUMBER = re.compile(r"(?<![\w.,])(?:(?<![\w)\]}])-)?(?:" + _NUMBER + r")(?![\w,]\d)")
_TEXT_WRAP = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{"
# what may follow a number and still leave it a number: words, text-wrapped words, unit powers, "per"-slashes
_UNIT_TAIL = re.compile(
    r"(?:\s*(?:" + _TEXT_WRAP + r"[^{}\d]*\}|\^\{?[23]\}?|/\s*[A-Za-z]+)|\s+[A-Za-z][A-Za-z'\-]+)*\s*"
)
_STANDALONE_NUMBER = re.compile(
    r"(?P<sign>-?)\s*(?:\$\s*)?(?P<sign2>-?)\s*(?P<num>" + _NUMBER + r")(?:\s*%)?(?P<tail>.*)", re.S
)
_ANSWER_IS = re.compile(r"(?:\bthe (?:final )?answer is|\bfinal answer(?:\s*\*\*)?\s*(?:is\b|[:=]))[\s:*]*", re.I)
_HASHES = re.compile(r"####[ \t]*")
_SENTENCE_END = re.compile(r"\n|\.(?=\s|$)|$")


def _braced(text: str, start: int) -> str | None:
    """The text from ``start`` to its closing brace (braces balanced), or None if it is never closed."""
    depth, i = 1, start
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1] if depth == 0 else None


def _boxed_starts(text: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]


def last_boxed(text: str) -> str | None:
    r"""Content of the last non-empty ``\boxed{...}`` or ``\fbox{...}`` with balanced braces."""
    for start in reversed(_boxed_starts(text)):
        content = _braced(text, start)
        if content and content.strip():
            return content.strip()
    return None


def gsm8k_gold(solution: str) -> str:
    """The gold answer of a GSM8K solution: the number after ``####``."""
    if "####" not in solution:
        raise ValueError("GSM8K solution has no '####' answer line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _phrase_after(pattern: re.Pattern[str], text: str, truncated: bool) -> str | None:
    """What follows the last match of ``pattern``, up to the end of its line or sentence."""
    for m in reversed(list(pattern.finditer(text))):
        rest = text[m.end() :]
        end = _SENTENCE_END.search(rest)
        if truncated and not end.group():
            return None  # runs into the cut: the answer may be incomplete
        phrase = _strip(rest[: end.start()])
        if phrase:
            return phrase
    return None


def extract_answer(text: str, *, truncated: bool = False) -> str | None:
    """The final answer of a completion as written (see the module docstring for the rules)."""
    starts = _boxed_starts(text)
    if truncated and starts and _braced(text, starts[-1]) is None:
        return None  # cut off while writing the boxed answer
    boxed = last_boxed(text)
    if boxed:
        return boxed
    for pattern in (_ANSWER_IS, _HASHES):
        phrase = _phrase_after(pattern, text, truncated)
        if phrase:
            return _answer_in_phrase(phrase)
    if truncated:
        return None
    nums = _TEXT_NUMBER.findall(text)
    return nums[-1] if nums else None


def _answer_in_phrase(phrase: str) -> str:
    """The answer in a phrase after "the answer is": its math or number, not the prose around it."""
    math = re.findall(r"(?<!\\)\$((?:\\\$|[^$])+?)(?<!\\)\$|\\\((.+?)\\\)", phrase)
    if math:
        return _strip("".join(math[-1]))
    if _as_number(phrase) is not None or not re.search(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}", phrase):
        return phrase
    nums = _TEXT_NUMBER.findall(phrase)
    return nums[-1] if len(nums) == 1 else phrase  # prose with one number ("she has 12 left") is that number


def _strip(s: str) -> str:
    """Drop surrounding whitespace, markdown bold, math delimiters and a final period."""
    s = s.strip().strip("*").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        inner = s[len(left) : -len(right)]
        if s.startswith(left) and s.endswith(right) and inner.strip() and left not in inner.replace("\\$", ""):
            s = inner.strip()
    return re.sub(r"(?:\s|\\[,;!]|\\quad)*\.?\s*$", "", s)


def _as_number(s: str) -> Decimal | None:
    """The number an answer is, by the rule in the module docstring; None if it is not just a number."""
    t = _strip(s).replace("−", "-").replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    t = re.sub(r"(?<=\d)(?:\\!|\\,)(?=\d)", "", t).replace("\\!", "")
    t = re.sub(r"\\[,;: ]|~", " ", t)
    for _ in range(2):  # \text{12 cm} -> 12 cm (the whole answer wrapped)
        m = re.fullmatch(_TEXT_WRAP + r"(.*)\}", t.strip(), re.S)
        if m and "{" not in m.group(1):
            t = m.group(1)
    m = _STANDALONE_NUMBER.fullmatch(t.strip())
    if not m or (m["sign"] and m["sign2"]) or not _UNIT_TAIL.fullmatch(m["tail"]):
        return None
    value = Decimal(m["num"].replace(",", ""))
    return -value if m["sign"] or m["sign2"] else value


def _canonical(d: Decimal) -> str:
    s = format(d.normalize(), "f")
    return "0" if s in ("-0", "0") else s


def normalize_answer(answer: str) -> str:
    """A number in canonical form (``1,200.50`` -> ``1200.5``), anything else as LaTeX without delimiters."""
    d = _as_number(answer)
    return _canonical(d) if d is not None else _strip(answer)


def _not_equivalent_errors() -> tuple[type[BaseException], ...]:
    """Exceptions from math-verify/sympy that mean "cannot be shown equal", nothing broader."""
    from math_verify.errors import TimeoutException
    from sympy import SympifyError
    from sympy.polys.polyerrors import BasePolynomialError

    # sympy signals ill-formed or undecidable math with these (e.g. "cannot determine truth value of
    # Relational" is a TypeError); bugs such as AttributeError, KeyError or RuntimeError propagate
    return (TimeoutException, SympifyError, BasePolynomialError, ValueError, TypeError, ArithmeticError,
            NotImplementedError, RecursionError)


def _math_verify_equal(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    errors = _not_equivalent_errors()
    try:
        g = parse(f"${gold}$", parsing_timeout=None, raise_on_error=True)
        p = parse(f"${pred}$", parsing_timeout=None, raise_on_error=True)
    except errors as e:
        _reraise_signal_error(e)
        return False
    for a, b in product(g, p):  # pair by pair, so one failing comparison does not hide another
        try:
            if verify(a, b, timeout_seconds=None, raise_on_error=True):
                return True
        except errors as e:
            _reraise_signal_error(e)
    return False


def _reraise_signal_error(e: BaseException) -> None:
    if isinstance(e, ValueError) and "signal" in str(e):  # a timeout was requested off the main thread
        raise e


def is_equivalent(pred: str | None, gold: str) -> bool:
    """Whether ``pred`` is the same answer as ``gold`` (numbers numerically, anything else by math-verify)."""
    if pred is None or not pred.strip():
        return False
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= Decimal("1e-6") * max(Decimal(1), abs(b))
    p, g = normalize_answer(pred), normalize_answer(gold)
    if _math_verify_equal(g, p):
        return True
    return re.sub(r"\s+", "", p) == re.sub(r"\s+", "", g)


def grade(text: str, gold: str, *, truncated: bool = False) -> tuple[str | None, bool]:
    """The normalized answer of a completion and whether it equals ``gold``.

    ``truncated``: the completion was cut off by the token limit (see the module docstring).
    """
    answer = extract_answer(text, truncated=truncated)
    pred = normalize_answer(answer) if answer is not None else None
    return (pred or None), is_equivalent(pred, gold)
