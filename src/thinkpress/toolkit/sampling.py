"""Sampling problems with the run's engine: N graded completions per problem, seeded per problem, resumable."""

from __future__ import annotations

from pydantic import Field

from thinkpress.api import ComponentConfig, GenParams, Problem, Sample, Sampler, StageContext, derive_seed, grade


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

    chunk = max(1, engine.preferred_chunk(batch_size) // n)
    recs = ctx.journal_map(problems, run_chunk, chunk_size=chunk, item_id=lambda p: p.id, desc=desc,
                           units_per_item=n)
    samples = [Sample.model_validate(r) for r in recs]
    ctx.stats.update(samples=len(samples), problems=len(problems), correct=sum(s.correct for s in samples),
                     truncated=sum(s.finish_reason == "length" for s in samples),
                     mean_tokens=sum(s.n_tokens for s in samples) / max(1, len(samples)))
    return samples


class SamplingConfig(ComponentConfig):
    """Settings of a :class:`GradedSampler` (subclass it to change the defaults)."""

    n: int = Field(default=4, ge=1, description="Completions per problem")
    temperature: float = Field(default=0.7, ge=0.0, description="Sampling temperature (0 = greedy)")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold")
    max_new_tokens: int = Field(default=384, ge=1, description="Token limit per completion")
    batch_size: int = Field(default=16, ge=1, description="Sequences decoded together")


class GradedSampler(Sampler):
    """A sampler that draws ``n`` completions per problem with the run's engine and grades them.

    A method's sampler subclasses it with its own ``name`` and a ``Config`` subclass of
    :class:`SamplingConfig` holding its defaults.
    """

    Config = SamplingConfig

    def sample(self, problems: list[Problem], ctx: StageContext) -> list[Sample]:
        c = self.config
        params = GenParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p)
        samples = sample_problems(problems, ctx, n=c.n, params=params, batch_size=c.batch_size)
        acc = ctx.stats["correct"] / max(1, len(samples))
        ctx.log(f"{len(samples)} samples, {acc:.1%} correct, {ctx.stats['truncated']} truncated")
        return samples
