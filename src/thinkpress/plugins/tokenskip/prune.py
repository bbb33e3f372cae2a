"""TokenSkip's trace pruner: score CoT tokens, keep the most important words, tag the prompt.

Per example (each a correct CoT + its final answer line, from the ``cot-filter`` selector):

1. the scorer gives each CoT token an importance; a word (a maximal run of non-whitespace) gets the
   mean over the tokens that overlap it, as LLMLingua-2 averages subword probabilities to words;
2. forced words are always kept: words containing one of ``force_tokens`` (published: "Step", ":")
   and, with ``keep_digits``, words containing a digit. They count against the budget;
3. the other words are kept from the most important down until the kept words hold a fraction
   ``gamma`` of the CoT's *model tokens* (a word's cost is the number of model tokens of
   ``" " + word``): a token-weighted (1 - gamma) percentile threshold. Every kept word scores at
   least as high as every dropped one (ties: earlier words first). When the forced words alone
   exceed the budget they are all kept and nothing else (counted as ``over_budget``);
4. the pruned CoT keeps its line structure: kept words of a line are joined by single spaces, a line
   that loses all its words disappears, blank lines between paragraphs stay (one at most).

Mixing: each example gets one gamma drawn uniformly from ``{1.0} + gammas`` (seeded per example id,
so the draw depends neither on order nor on resume; ``draws_per_example`` > 1 draws that many
distinct gammas and adds one training example per draw, for small data); at 1.0 the CoT is kept whole and the prompt has
no tag; otherwise the question carries the ratio tag (``tag_format``, default the original
``<|eot_id|>{gamma}<|eot_id|>`` after the question), or with ``tag_position: response`` the model's turn
starts with it (evaluation feeds it the same way). Target = pruned CoT + the original answer line.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from statistics import mean
from typing import Any, Literal

from pydantic import Field, field_validator

from thinkpress.api import (
    ComponentConfig,
    ConfigError,
    Example,
    StageContext,
    TokenList,
    TracePruner,
    TrainingSet,
    check_surfaces,
    stable_hash,
    validate_scorer,
)

_WORD = re.compile(r"\S+")
_DIGIT = re.compile(r"\d")


@dataclass
class Word:
    start: int
    end: int
    text: str
    score: float
    forced: bool = False
    cost: int = 1


def word_scores(text: str, tokens: TokenList) -> list[Word]:
    """Words of ``text`` with the mean score of the tokens that overlap them."""
    bounds, pos = [], 0
    for surface, score in tokens:
        if surface:
            bounds.append((pos, pos + len(surface), score))
        pos += len(surface)
    if pos != len(text):
        raise ValueError(f"token surfaces cover {pos} characters, the text has {len(text)}")
    words, t = [], 0
    for m in _WORD.finditer(text):
        ws, we = m.span()
        while t < len(bounds) and bounds[t][1] <= ws:
            t += 1
        vals, k = [], t
        while k < len(bounds) and bounds[k][0] < we:
            vals.append(bounds[k][2])
            k += 1
        words.append(Word(ws, we, m.group(0), mean(vals)))
    return words


def mark_forced(words: list[Word], force_tokens: list[str], keep_digits: bool) -> None:
    for w in words:
        w.forced = any(f in w.text for f in force_tokens) or (keep_digits and bool(_DIGIT.search(w.text)))


def select_words(words: list[Word], gamma: float) -> tuple[list[bool], bool]:
    """Which words to keep so that they hold ``gamma`` of the total cost; and whether forced words overflowed."""
    if gamma >= 1.0:
        return [True] * len(words), False
    budget = gamma * sum(w.cost for w in words)
    keep = [w.forced for w in words]
    kept = sum(w.cost for w in words if w.forced)
    over = kept > budget
    for i in sorted((i for i, w in enumerate(words) if not w.forced), key=lambda i: (-words[i].score, i)):
        cost = words[i].cost
        if kept + cost / 2 > budget:  # rounds to the nearest achievable fraction
            break
        keep[i] = True
        kept += cost
    return keep, over


def rebuild(text: str, words: list[Word], keep: list[bool]) -> str:
    """The kept words, in order, line by line (see the module docstring)."""
    lines: list[str] = []
    wi = 0
    pos = 0
    for raw in text.split("\n"):
        end = pos + len(raw)
        kept, had = [], False
        while wi < len(words) and words[wi].start < end:
            had = True
            if keep[wi]:
                kept.append(words[wi].text)
            wi += 1
        if kept:
            lines.append(raw[: len(raw) - len(raw.lstrip())] + " ".join(kept))
        elif not had and lines and lines[-1] != "":
            lines.append("")  # a paragraph break
        pos = end + 1
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines)


def prune_cot(text: str, tokens: TokenList, gamma: float, *, force_tokens: list[str], keep_digits: bool,
              cost: Callable[[str], int]) -> tuple[str, dict[str, Any]]:
    """The CoT pruned to ``gamma`` of its model tokens, and what happened (word/cost counts)."""
    words = word_scores(text, tokens)
    mark_forced(words, force_tokens, keep_digits)
    for w in words:
        w.cost = cost(w.text)
    keep, over = select_words(words, gamma)
    total = sum(w.cost for w in words)
    kept = sum(w.cost for w, k in zip(words, keep, strict=True) if k)
    return rebuild(text, words, keep), {"words": len(words), "kept_words": sum(keep), "over_budget": over,
                                        "cost_ratio": kept / total if total else 1.0}


def ratio_tag(fmt: str, gamma: float) -> str:
    return "" if gamma >= 1.0 else fmt.format(gamma=f"{gamma:g}")


def tagged_prompt(engine, question: str, tag: str, position: str) -> str:
    """The model input for ``question`` with ratio tag ``tag`` at ``position`` (question or response)."""
    if position == "response":
        return engine.chat_prompt(question) + tag
    return engine.chat_prompt(question, suffix=tag)


class TokenSkipPruner(TracePruner):
    name = "tokenskip"
    description = "importance-pruned CoTs at a ratio gamma drawn per example; the ratio tag goes in the prompt"

    class Config(ComponentConfig):
        scorer: str = Field(default="self-information", description="Token-importance scorer (register_scorers)")
        scorer_options: dict[str, Any] = Field(default_factory=dict, description="Options passed to the scorer "
                                               "(e.g. model, batch_size)")
        gammas: list[float] = Field(default=[0.9, 0.8, 0.7, 0.6, 0.5], min_length=1,
                                    description="Compression ratios (kept fraction of CoT tokens), each in (0, 1]")
        include_full: bool = Field(default=True, description="Also draw gamma = 1.0 (unpruned, no tag)")
        draws_per_example: int = Field(default=1, ge=1, description="Distinct gammas drawn per example (1: the "
                                       "published mix; more: each CoT at several ratios, for small data)")
        tag_format: str = Field(default="<|eot_id|>{gamma}<|eot_id|>",
                                description="Ratio tag; {gamma} is replaced (0.9, 0.5)")
        tag_position: Literal["question", "response"] = Field(
            default="question", description="question: the tag follows the question in the user turn (the "
            "original); response: the model's turn starts with it (fed at evaluation, not generated)")
        force_tokens: list[str] = Field(default=["Step", ":"], description="Words containing any of these are kept")
        keep_digits: bool = Field(default=True, description="Keep every word that contains a digit")
        batch_size: int = Field(default=8, ge=1, description="Traces scored per chunk (journaled for resume)")

        @field_validator("gammas")
        @classmethod
        def _gammas_in_range(cls, v: list[float]) -> list[float]:
            bad = [g for g in v if not 0.0 < g <= 1.0]
            if bad:
                raise ValueError(f"every gamma must be in (0, 1]; got {bad}")
            if len(set(v)) != len(v):
                raise ValueError(f"gammas must be distinct; got {v}")
            return v

        @field_validator("tag_format")
        @classmethod
        def _tag_has_gamma(cls, v: str) -> str:
            if "{gamma}" not in v:
                raise ValueError("tag_format must contain {gamma}")
            try:
                v.format(gamma="0.5")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"tag_format is not a valid format string with only {{gamma}} ({e})") from None
            return v

    def check(self, registry) -> None:
        c = self.config
        if c.scorer not in registry.scorers:
            raise ConfigError(f"components.{self.name}.scorer: unknown scorer {c.scorer!r}; "
                              f"available: {', '.join(sorted(registry.scorers))}")
        validate_scorer(registry.scorer(c.scorer), c.scorer, c.scorer_options, f"components.{self.name}.scorer_options")
        own_model = c.scorer_options.get("model") is not None
        self._engine_needs = frozenset() if own_model else getattr(registry.scorer(c.scorer), "run_engine_requires",
                                                                   frozenset())

    def requirements(self) -> frozenset[str]:
        """What the scorer needs from the run's engine (nothing when it loads its own model)."""
        return getattr(self, "_engine_needs", frozenset())

    def all_gammas(self) -> list[float]:
        return ([1.0] if self.config.include_full and 1.0 not in self.config.gammas else []) + list(self.config.gammas)

    def draw(self, example_id: str, seed: int) -> list[float]:
        """``draws_per_example`` distinct gammas, uniformly without replacement, seeded by the example id."""
        gammas = self.all_gammas()
        k = min(self.config.draws_per_example, len(gammas))
        return random.Random(stable_hash(seed, "tokenskip-gamma", example_id)).sample(gammas, k)

    def prune(self, data: TrainingSet, ctx: StageContext) -> TrainingSet:
        c = self.config
        missing = [e.id for e in data.examples if not {"question", "cot", "answer_tail"} <= set(e.meta)]
        if missing:
            raise ConfigError(f"tokenskip needs examples with the CoT split from the answer line (meta question/cot/"
                              f"answer_tail), as the 'cot-filter' selector writes; {len(missing)} lack it, e.g. "
                              f"{missing[0]!r}. Use --set stages.selector=cot-filter.")
        factory = ctx.run.registry.scorer(c.scorer)
        scorer = factory(ctx, **c.scorer_options)
        batch = getattr(scorer, "score_batch", None)

        def run_chunk(chunk: list[Example]) -> list[dict]:
            prompts, texts = [e.prompt for e in chunk], [e.meta["cot"] for e in chunk]
            if batch is not None:
                scored = batch(prompts, texts)
            else:
                scored = [scorer.score(p, t) for p, t in zip(prompts, texts, strict=True)]
            for text, toks in zip(texts, scored, strict=True):
                check_surfaces(text, toks, c.scorer)
            return [{"id": e.id, "tokens": toks} for e, toks in zip(chunk, scored, strict=True)]

        recs = ctx.journal_map(data.examples, run_chunk, chunk_size=c.batch_size, item_id=lambda e: e.id,
                               desc=f"scoring CoT tokens ({c.scorer})")
        scores = {r["id"]: [tuple(t) for t in r["tokens"]] for r in recs}
        engine = ctx.engine
        cost_cache: dict[str, int] = {}

        def cost(word: str) -> int:
            if word not in cost_cache:
                cost_cache[word] = max(1, engine.count_tokens(" " + word))
            return cost_cache[word]

        tags = {f"{g:g}": ratio_tag(c.tag_format, g) for g in self.all_gammas()}
        out, per_gamma, over = [], {}, 0
        for e in data.examples:
            cot, toks = e.meta["cot"], scores[e.id]
            n_cot = engine.count_tokens(cot)
            drawn = self.draw(e.id, ctx.seed)
            # Every gamma is pruned for the statistics (the pruner's own adherence); the drawn ones are kept.
            kept: dict[float, tuple[str, dict]] = {}
            for gg in self.all_gammas():
                if gg >= 1.0:  # kept whole, byte for byte
                    text, info = cot, {"words": None, "kept_words": None, "over_budget": False}
                else:
                    text, info = prune_cot(cot, toks, gg, force_tokens=c.force_tokens, keep_digits=c.keep_digits,
                                           cost=cost)
                st = per_gamma.setdefault(f"{gg:g}", {"ratios": [], "over": 0, "drawn": 0})
                st["ratios"].append(engine.count_tokens(text) / n_cot if n_cot else 1.0)
                st["over"] += info["over_budget"]
                if gg in drawn:
                    kept[gg] = (text, info)
            for j, g in enumerate(drawn):
                pruned, info = kept[g]
                per_gamma[f"{g:g}"]["drawn"] += 1
                over += info["over_budget"]
                tag = tags[f"{g:g}"]
                prompt = tagged_prompt(engine, e.meta["question"], tag, c.tag_position) if tag else e.prompt
                out.append(Example(id=e.id if j == 0 else f"{e.id}@{g:g}", problem_id=e.problem_id, prompt=prompt,
                                   completion=pruned + e.meta["answer_tail"],
                                   meta={**e.meta, "gamma": g, "prompt_suffix": tag, "ratio_tags": tags,
                                         "tag_position": c.tag_position,
                                         "pruned_cot": pruned, "kept_words": info["kept_words"],
                                         "words": info["words"]}))
        summary = {g: {"drawn": st["drawn"], "mean_token_ratio": round(mean(st["ratios"]), 4),
                       "over_budget": st["over"]} for g, st in per_gamma.items()}
        ctx.stats.update(examples=len(out), scorer=c.scorer, over_budget=over, by_gamma=summary)
        for g, s in summary.items():
            over_msg = f"; forced words over budget in {s['over_budget']}" if s["over_budget"] else ""
            ctx.log(f"gamma {g}: {s['drawn']} drawn; pruned CoTs keep {s['mean_token_ratio']:.3f} of the tokens "
                    f"on average (all examples){over_msg}")
        return TrainingSet(examples=out, pairs=data.pairs)
