"""Adaptive-depth selection (TokenSqueeze step 2) and its ablation variants.

For a problem with N graded samples of which c are correct (truncated samples never count as
correct answers; they can be rejected ones), p = c / N. Positives are the k shortest correct
samples (by token count); each positive is paired with every *incorrect* sample longer than it,
at most ``max_pairs`` pairs per problem (pairs with the longest rejected answers first, round-robin
over positives). Problems with p = 0 or p = 1 give no pairs. How k is chosen is the variant:

* ``q-dyn`` (default): q = alpha * (1 - p), k = ceil(q * c); easy problems keep the shortest
  answers, hard ones keep more depth;
* ``shortest-correct``: k = 1;
* ``fixed-quantile``: k = ceil(quantile * c), the same quantile for every problem;
* ``extra-positives``: q-dyn, and the correct samples longer than a positive are rejected answers
  too (the paper's ablation: it hurts accuracy).

The positives also become SFT examples (the trainer's SFT term and SFT-only ablations use them).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import Counter, defaultdict

from pydantic import Field

from thinkpress.api import (
    ComponentConfig,
    Example,
    PreferencePair,
    Problem,
    Sample,
    Selector,
    StageContext,
    TrainingSet,
)


class DepthConfig(ComponentConfig):
    max_pairs: int = Field(default=64, ge=1, description="At most M preference pairs per problem")
    min_gap: int = Field(default=1, ge=0, description="A rejected answer must be at least this many tokens longer")


def is_usable_correct(s: Sample) -> bool:
    return s.correct and s.finish_reason != "length"


class DepthSelector(Selector):
    """Shared logic of the four variants; subclasses define :meth:`num_positives`."""

    Config = DepthConfig
    long_correct_negatives = False

    @abstractmethod
    def num_positives(self, c: int, n: int) -> int:
        """k: how many of the c correct samples (of n) become positives."""

    def select(self, samples: list[Sample], problems: list[Problem], ctx: StageContext) -> TrainingSet:
        cfg = self.config
        by_problem: dict[str, list[Sample]] = defaultdict(list)
        for s in samples:
            by_problem[s.problem_id].append(s)
        difficulty = {p.id: p.difficulty for p in problems}
        examples: list[Example] = []
        pairs: list[PreferencePair] = []
        counts: dict[str, Counter] = defaultdict(Counter)
        k_dist: Counter = Counter()
        for pid, group in by_problem.items():
            level = str(difficulty.get(pid))
            counts[level]["problems"] += 1
            n = len(group)
            correct = sorted((s for s in group if is_usable_correct(s)), key=lambda s: (s.n_tokens, s.index))
            c = len(correct)
            if c == 0:
                counts[level]["all_wrong"] += 1
                continue
            if c == n:
                counts[level]["all_correct"] += 1
                continue
            k = max(1, min(c, self.num_positives(c, n)))
            positives = correct[:k]
            chosen_ids = {s.index for s in positives}
            pool = [s for s in group if not is_usable_correct(s)]
            if self.long_correct_negatives:
                pool += [s for s in correct if s.index not in chosen_ids]
            pool.sort(key=lambda s: (-s.n_tokens, s.index))
            per_pos = [[r for r in pool if r.n_tokens >= pos.n_tokens + cfg.min_gap] for pos in positives]
            made: list[PreferencePair] = []
            for j in range(max((len(x) for x in per_pos), default=0)):  # round-robin over positives
                for pos, rej in zip(positives, per_pos, strict=True):
                    if j < len(rej) and len(made) < cfg.max_pairs:
                        r = rej[j]
                        made.append(PreferencePair(
                            id=f"{pid}#{pos.index}>{r.index}", problem_id=pid, prompt=pos.prompt,
                            chosen=pos.completion, rejected=r.completion,
                            meta={"chosen_tokens": pos.n_tokens, "rejected_tokens": r.n_tokens,
                                  "rejected_correct": r.correct, "p": c / n, "k": k}))
            if not made:
                counts[level]["no_longer_rejected"] += 1
                continue
            counts[level]["with_pairs"] += 1
            k_dist[k] += 1
            counts[level]["pairs"] += len(made)
            pairs += made
            for pos in positives:
                examples.append(Example(id=f"{pid}#{pos.index}", problem_id=pid, prompt=pos.prompt,
                                        completion=pos.completion, meta={"n_tokens": pos.n_tokens, "p": c / n}))
        per_level = {lvl: dict(cnt) for lvl, cnt in sorted(counts.items())}
        ctx.stats.update(pairs=len(pairs), examples=len(examples),
                         problems_with_pairs=sum(c["with_pairs"] for c in counts.values()), by_difficulty=per_level)
        if examples:
            mean_pos = sum(e.meta["n_tokens"] for e in examples) / len(examples)
            ctx.stats["mean_chosen_tokens"] = mean_pos
        ctx.stats["mean_sample_tokens"] = sum(s.n_tokens for s in samples) / max(1, len(samples))
        # k per problem with pairs: with alpha = 0.2, k = ceil(alpha (1 - p) c) exceeds 1 only when
        # alpha (1 - p) c > 1, i.e. from N > 20 on at best (p = 1/2); below that q-dyn selects what
        # shortest-correct does, and the log says so.
        ctx.stats["k_distribution"] = {str(k): k_dist[k] for k in sorted(k_dist)}
        if k_dist:
            ctx.log("positives per problem (k: problems): " + ", ".join(f"{k}: {k_dist[k]}" for k in sorted(k_dist)))
            if set(k_dist) == {1} and self.name != "shortest-correct":
                ctx.log(f"every problem got k = 1: {self.name} selected what shortest-correct would "
                        "(raise N, the samples per problem, for adaptive depth to act)")
        for lvl, cnt in per_level.items():
            ctx.log(f"difficulty {lvl}: {cnt.get('problems', 0)} problems, {cnt.get('with_pairs', 0)} with pairs, "
                    f"{cnt.get('pairs', 0)} pairs ({cnt.get('all_correct', 0)} all correct, "
                    f"{cnt.get('all_wrong', 0)} all wrong)")
        if not pairs:
            ctx.log("no preference pairs: every problem was all-correct or all-wrong (p = 1 or 0), or no incorrect "
                    "answer was longer than a positive; use more or harder problems, or a larger N")
        return TrainingSet(examples=examples, pairs=pairs)


class QDynConfig(DepthConfig):
    alpha: float = Field(default=0.2, gt=0.0, le=1.0, description="q = alpha * (1 - p): depth scale")


class QDyn(DepthSelector):
    name = "q-dyn"
    description = "Adaptive depth: k = ceil(alpha*(1-p)*c) shortest correct vs. longer incorrect (TokenSqueeze)"
    Config = QDynConfig

    def num_positives(self, c: int, n: int) -> int:
        return math.ceil(self.config.alpha * (1 - c / n) * c)


class ShortestCorrect(DepthSelector):
    name = "shortest-correct"
    description = "Ablation: only the shortest correct answer vs. longer incorrect ones"

    def num_positives(self, c: int, n: int) -> int:
        return 1


class FixedQuantileConfig(DepthConfig):
    quantile: float = Field(default=0.2, gt=0.0, le=1.0, description="k = ceil(quantile * c) for every problem")


class FixedQuantile(DepthSelector):
    name = "fixed-quantile"
    description = "Ablation: a fixed quantile of the correct answers, whatever the problem's difficulty"
    Config = FixedQuantileConfig

    def num_positives(self, c: int, n: int) -> int:
        return math.ceil(self.config.quantile * c)


class ExtraPositives(QDyn):
    name = "extra-positives"
    description = "Ablation: q-dyn, with long correct answers as rejected ones too"
    long_correct_negatives = True


SELECTORS = [QDyn, ShortestCorrect, FixedQuantile, ExtraPositives]
