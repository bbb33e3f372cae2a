"""TokenSkip's data: greedy answers on the train split, correct ones kept, CoT split from the answer line."""

from __future__ import annotations

import re

from pydantic import Field

from thinkpress.api import (
    ComponentConfig,
    Example,
    GenParams,
    Problem,
    Sample,
    Sampler,
    Selector,
    StageContext,
    TrainingSet,
)
from thinkpress.toolkit.sampling import sample_problems

_ANSWER_MARKERS = (re.compile(r"\\(?:boxed|fbox)\s*\{"), re.compile(r"(?:the (?:final )?answer is|final answer\s*[:=])",
                                                                       re.I), re.compile(r"####"))


def _is_marked(line: str) -> bool:
    return any(m.search(line) for m in _ANSWER_MARKERS)


_DISPLAY_OPEN = {"\\[", "$$", "\\begin{align*}", "\\begin{align}", "\\begin{equation}"}


def split_answer(completion: str, pred: str | None = None) -> tuple[str, str] | None:
    """``(cot, answer_tail)``: the reasoning, and the rest from the final answer's lines on.

    Answer lines hold a ``\\boxed{}``, "the answer is" / "final answer" or GSM8K's ``####``; when
    none does, the last line that contains the extracted answer ``pred`` (as a whole number or word)
    is one. The tail starts at the last answer line and takes in the answer lines (and blank lines)
    right above it, so "#### 16\\nThe answer is: 16" stays together; a display-math opener right
    above (``\\[``, ``$$``) belongs to it. ``cot + answer_tail == completion``: the whitespace between
    them stays in the tail. None when no line holds an answer.
    """
    lines = completion.split("\n")
    marked = [k for k, line in enumerate(lines) if _is_marked(line)]
    if marked:
        i = marked[-1]
        while i > 0 and (not lines[i - 1].strip() or _is_marked(lines[i - 1])):
            i -= 1
    elif pred:
        word = re.compile(r"(?<![\w.])" + re.escape(pred) + r"(?![\w]|\.\d)")
        found = [k for k, line in enumerate(lines) if word.search(line)]
        if not found:
            return None
        i = found[-1]
    else:
        return None
    while i > 0 and lines[i - 1].strip() in _DISPLAY_OPEN:
        i -= 1
    start = sum(len(x) + 1 for x in lines[:i])
    cot = completion[:start].rstrip()
    return cot, completion[len(cot):]


class GreedySampler(Sampler):
    name = "greedy-sampler"
    description = "one greedy answer per training problem, graded (TokenSkip step 1)"

    class Config(ComponentConfig):
        max_new_tokens: int = Field(default=512, ge=1, description="Token limit per answer")
        batch_size: int = Field(default=16, ge=1, description="Sequences decoded together")

    def sample(self, problems: list[Problem], ctx: StageContext) -> list[Sample]:
        c = self.config
        params = GenParams(max_new_tokens=c.max_new_tokens, temperature=0.0)
        samples = sample_problems(problems, ctx, n=1, params=params, batch_size=c.batch_size, desc="greedy answers")
        ctx.log(f"{len(samples)} answers, {ctx.stats['correct']} correct, {ctx.stats['truncated']} truncated")
        return samples


class CoTFilter(Selector):
    name = "cot-filter"
    description = "correct answers whose CoT fits the token limit, split into CoT + final answer line"

    class Config(ComponentConfig):
        max_tokens: int = Field(default=500, ge=1, description="Drop answers longer than this many tokens")

    def select(self, samples: list[Sample], problems: list[Problem], ctx: StageContext) -> TrainingSet:
        questions = {p.id: p.question for p in problems}
        counts = {"samples": len(samples), "wrong": 0, "truncated": 0, "too_long": 0, "no_answer_line": 0,
                  "empty_cot": 0}
        examples = []
        for s in samples:
            if not s.correct:
                counts["wrong"] += 1
                continue
            if s.finish_reason == "length":
                counts["truncated"] += 1
                continue
            if s.n_tokens > self.config.max_tokens:
                counts["too_long"] += 1
                continue
            split = split_answer(s.completion, s.pred)
            if split is None:
                counts["no_answer_line"] += 1
                continue
            cot, tail = split
            if not cot.strip():
                counts["empty_cot"] += 1
                continue
            examples.append(Example(id=f"{s.problem_id}#{s.index}", problem_id=s.problem_id, prompt=s.prompt,
                                    completion=s.completion,
                                    meta={"question": questions[s.problem_id], "cot": cot, "answer_tail": tail,
                                          "n_tokens": s.n_tokens}))
        counts["examples"] = len(examples)
        ctx.stats.update(counts)
        ctx.log(f"{len(examples)} examples from {len(samples)} answers; skipped: "
                + ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("samples", "examples")))
        return TrainingSet(examples=examples)
