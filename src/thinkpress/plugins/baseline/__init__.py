"""Built-in ``baseline`` plugin: rejection-sampling fine-tuning (RFT).

* ``rejection-sampler``: N completions per training problem (temperature T), graded;
* ``keep-correct``: the correct ones become SFT examples (deduplicated, optionally length-capped);
* ``lora-sft``: LoRA SFT on the completions only (see :mod:`thinkpress.toolkit.lora`).

Each stage a selected plugin does not provide falls back to these components.
"""

from __future__ import annotations

from pydantic import Field

from thinkpress.api import ComponentConfig, Example, Problem, Sample, Selector, StageContext, TrainingSet, hookimpl
from thinkpress.plugins.baseline.sft import LoraSFT
from thinkpress.toolkit.sampling import GradedSampler, SamplingConfig


class RejectionSampler(GradedSampler):
    name = "rejection-sampler"
    description = "N sampled completions per training problem, graded against the gold answer"

    Config = SamplingConfig


class KeepCorrect(Selector):
    name = "keep-correct"
    description = "Correct, non-truncated samples become SFT targets (deduplicated per problem)"

    class Config(ComponentConfig):
        max_per_problem: int | None = Field(default=None, ge=1, description="Keep at most this many per problem")
        max_tokens: int | None = Field(default=None, ge=1, description="Drop completions longer than this")
        dedupe: bool = Field(default=True, description="Drop identical completions of the same problem")

    def select(self, samples: list[Sample], problems: list[Problem], ctx: StageContext) -> TrainingSet:
        c = self.config
        by_problem: dict[str, list[Sample]] = {}
        for s in samples:
            if s.correct and s.finish_reason != "length" and (c.max_tokens is None or s.n_tokens <= c.max_tokens):
                by_problem.setdefault(s.problem_id, []).append(s)
        examples = []
        for pid, group in by_problem.items():
            seen = set()
            for s in group:
                if c.dedupe and s.completion in seen:
                    continue
                seen.add(s.completion)
                examples.append(Example(id=f"{pid}#{s.index}", problem_id=pid, prompt=s.prompt,
                                        completion=s.completion, meta={"n_tokens": s.n_tokens}))
                if c.max_per_problem and len(seen) >= c.max_per_problem:
                    break
        ctx.stats.update(examples=len(examples), problems_with_examples=len(by_problem))
        ctx.log(f"{len(examples)} examples from {len(by_problem)}/{len(problems)} problems")
        return TrainingSet(examples=examples)


@hookimpl
def register_samplers(register):
    register(RejectionSampler)


@hookimpl
def register_selectors(register):
    register(KeepCorrect)


@hookimpl
def register_trainers(register):
    register(LoraSFT)


@hookimpl
def register_presets(register):
    # RFT is what a run does when no plugin is named, and it fills the stages other plugins leave open.
    fallback = {"sampler": RejectionSampler.name, "selector": KeepCorrect.name, "trainer": LoraSFT.name}
    register("smoke", {"plugins": ["baseline"], "fallback": fallback, "components": {
        "rejection-sampler": {"n": 4, "temperature": 0.7, "max_new_tokens": 128, "batch_size": 32},
        "lora-sft": {"epochs": 2, "batch_size": 4, "grad_accum": 1, "max_length": 256, "lr": 2e-4},
    }})
    register("default", {"plugins": ["baseline"], "fallback": fallback, "components": {
        "rejection-sampler": {"n": 2, "max_new_tokens": 320, "batch_size": 16},
        "lora-sft": {"epochs": 1, "batch_size": 4, "grad_accum": 2, "max_length": 512, "lr": 2e-4},
    }})
