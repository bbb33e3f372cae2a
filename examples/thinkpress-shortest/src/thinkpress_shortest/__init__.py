"""Example thinkpress plugin: keep the shortest correct sample(s) of each problem."""

from __future__ import annotations

from pydantic import Field

import thinkpress
from thinkpress.api import ComponentConfig, Example, Selector, TrainingSet

__version__ = "0.1.0"


class Shortest(Selector):
    name = "shortest"
    description = "Keep the shortest correct sample(s) of each problem as SFT targets"

    class Config(ComponentConfig):
        per_problem: int = Field(default=1, ge=1, description="How many of the shortest samples to keep per problem")
        correct_only: bool = Field(default=True, description="Consider only correct, non-truncated samples")

    def select(self, samples, problems, ctx) -> TrainingSet:
        groups: dict[str, list] = {}
        for s in samples:
            if not self.config.correct_only or (s.correct and s.finish_reason != "length"):
                groups.setdefault(s.problem_id, []).append(s)
        examples = []
        for pid, group in groups.items():
            for s in sorted(group, key=lambda s: (s.n_tokens, s.index))[: self.config.per_problem]:
                examples.append(Example(id=f"{pid}#{s.index}", problem_id=pid, prompt=s.prompt,
                                        completion=s.completion, meta={"n_tokens": s.n_tokens}))
        ctx.stats["examples"] = len(examples)
        return TrainingSet(examples=examples)


@thinkpress.hookimpl
def register_selectors(register):
    register(Shortest)
