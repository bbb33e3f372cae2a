"""Built-in ``baseline`` plugin: rejection-sampling fine-tuning (RFT).

* ``rejection-sampler``: N completions per training problem (temperature T), graded;
* ``keep-correct``: the correct ones become SFT examples (deduplicated, optionally length-capped);
* ``lora-sft``: LoRA SFT on the completions only (see :mod:`thinkpress.plugins.baseline.sft`).

Each stage a selected plugin does not provide falls back to these components.
"""

from __future__ import annotations

from pydantic import Field

from thinkpress import hookimpl
from thinkpress.core.context import StageContext
from thinkpress.core.data import Example, Problem, Sample, TrainingSet
from thinkpress.core.engines.base import GenParams
from thinkpress.core.evaluation import grade
from thinkpress.core.stages import ComponentConfig, Sampler, Selector
from thinkpress.core.store import derive_seed
from thinkpress.plugins.baseline.sft import LoraSFT


def problem_seed(seed: int, problem_id: str) -> int:
    """Per-problem seed: a problem's samples do not depend on batching or on resume."""
    return derive_seed(seed, problem_id)


def sample_problems(problems: list[Problem], ctx: StageContext, *, n: int, params: GenParams, batch_size: int,
                    desc: str = "sampling") -> list[Sample]:
    """Generate ``n`` graded samples per problem, resumable per chunk of problems."""
    engine = ctx.engine

    def run_chunk(chunk: list[Problem]) -> list[Sample]:
        prompts = [engine.chat_prompt(p.question) for p in chunk]
        outs = engine.generate(prompts, params, n=n, seeds=[problem_seed(ctx.seed, p.id) for p in chunk],
                               batch_size=batch_size, logprobs=True)
        samples = []
        for p, prompt, comps in zip(chunk, prompts, outs, strict=True):
            for j, c in enumerate(comps):
                pred, ok = grade(c.text, p.answer, truncated=c.finish_reason == "length")
                samples.append(Sample(problem_id=p.id, index=j, prompt=prompt, completion=c.text, n_tokens=c.n_tokens,
                                      finish_reason=c.finish_reason, pred=pred, correct=ok,
                                      logprob=sum(c.logprobs) if c.logprobs else None))
        return samples

    chunk = max(1, batch_size // n)
    recs = ctx.journal_map(problems, run_chunk, chunk_size=chunk, item_id=lambda p: p.id, desc=desc,
                           units_per_item=n)
    samples = [Sample.model_validate(r) for r in recs]
    ctx.stats.update(samples=len(samples), problems=len(problems), correct=sum(s.correct for s in samples),
                     truncated=sum(s.finish_reason == "length" for s in samples))
    return samples


class RejectionSampler(Sampler):
    name = "rejection-sampler"
    description = "N sampled completions per training problem, graded against the gold answer"

    class Config(ComponentConfig):
        n: int = Field(default=4, ge=1, description="Completions per problem")
        temperature: float = Field(default=0.7, ge=0.0, description="Sampling temperature (0 = greedy)")
        top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold")
        max_new_tokens: int = Field(default=384, ge=1, description="Token limit per completion")
        batch_size: int = Field(default=16, ge=1, description="Sequences decoded together")

    def sample(self, problems: list[Problem], ctx: StageContext) -> list[Sample]:
        c = self.config
        params = GenParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p)
        samples = sample_problems(problems, ctx, n=c.n, params=params, batch_size=c.batch_size)
        acc = ctx.stats["correct"] / max(1, len(samples))
        ctx.log(f"{len(samples)} samples, {acc:.1%} correct, {ctx.stats['truncated']} truncated")
        return samples


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
