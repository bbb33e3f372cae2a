"""Sampling problems with the run's engine: N graded completions per problem, seeded per problem, resumable."""

from __future__ import annotations

import dataclasses

from pydantic import Field

from thinkpress.api import ComponentConfig, GenParams, Problem, Sample, Sampler, StageContext, derive_seed, grade


def problem_seed(seed: int, problem_id: str) -> int:
    """Per-problem seed: a problem's samples do not depend on batching or on resume."""
    return derive_seed(seed, problem_id)


def _request_base(ctx: StageContext, params: GenParams, n: int) -> dict:
    """What every problem's request shares (the :class:`~thinkpress.core.store.SampleCache` key, less prompt and
    seed); built once per call, so the model identity (a file hash for local models) is not recomputed per problem."""
    from thinkpress.core.models import model_identity

    cfg = ctx.config
    return {"model": model_identity(cfg.model), "adapter": ctx.adapter, "engine": ctx.engine_name or cfg.engine,
            "dtype": cfg.dtype, "params": dataclasses.asdict(params), "n": n, "logprobs": True}


def sample_problems(problems: list[Problem], ctx: StageContext, *, n: int, params: GenParams, batch_size: int,
                    desc: str = "sampling") -> list[Sample]:
    """Generate ``n`` graded samples per problem, resumable per chunk of problems.

    With ``sample_cache`` on (the default), a problem whose request an earlier run already decoded
    (same model, adapter, engine, prompt, settings and seed) is read from the shared sample cache;
    only the others are decoded. ``stats["from_sample_cache"]`` counts the problems read.
    """
    engine = ctx.engine
    cache = ctx.run.store.sample_cache() if ctx.config.sample_cache else None
    shared = _request_base(ctx, params, n) if cache else {}
    reused = 0

    def run_chunk(chunk: list[Problem]) -> list[Sample]:
        nonlocal reused
        prompts = [engine.chat_prompt(p.question) for p in chunk]
        seeds = [problem_seed(ctx.seed, p.id) for p in chunk]
        requests = [{**shared, "prompt": pr, "seed": None if params.greedy else sd}
                    for pr, sd in zip(prompts, seeds, strict=True)]
        keys = [cache.key(r) for r in requests] if cache else [None] * len(chunk)
        found = [cache.get(k) if cache else None for k in keys]
        found = [f if f is not None and len(f) == n else None for f in found]
        todo = [i for i, f in enumerate(found) if f is None]
        reused += len(chunk) - len(todo)
        if todo:
            outs = engine.generate([prompts[i] for i in todo], params, n=n, seeds=[seeds[i] for i in todo],
                                   batch_size=batch_size, logprobs=True)
            for i, comps in zip(todo, outs, strict=True):
                found[i] = [{"text": c.text, "n_tokens": c.n_tokens, "finish_reason": c.finish_reason,
                             "logprob": sum(c.logprobs) if c.logprobs else None} for c in comps]
                if cache:
                    cache.put(keys[i], requests[i], found[i])
        samples = []
        for p, prompt, comps in zip(chunk, prompts, found, strict=True):
            for j, c in enumerate(comps):
                pred, ok = grade(c["text"], p.answer, truncated=c["finish_reason"] == "length")
                samples.append(Sample(problem_id=p.id, index=j, prompt=prompt, completion=c["text"],
                                      n_tokens=c["n_tokens"], finish_reason=c["finish_reason"], pred=pred, correct=ok,
                                      logprob=c["logprob"]))
        return samples

    chunk = max(1, engine.preferred_chunk(batch_size) // n)
    recs = ctx.journal_map(problems, run_chunk, chunk_size=chunk, item_id=lambda p: p.id, desc=desc,
                           units_per_item=n)
    samples = [Sample.model_validate(r) for r in recs]
    ctx.stats.update(samples=len(samples), problems=len(problems), correct=sum(s.correct for s in samples),
                     truncated=sum(s.finish_reason == "length" for s in samples),
                     mean_tokens=sum(s.n_tokens for s in samples) / max(1, len(samples)))
    if reused:
        ctx.stats["from_sample_cache"] = reused
        ctx.log(f"{reused} of {len(problems)} problems' completions read from the sample cache")
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
