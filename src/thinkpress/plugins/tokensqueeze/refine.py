"""Distribution-aligned step refinement (TokenSqueeze step 3): the ``kl-step`` refiner.

A chosen trace is split into steps (``delimiter``, blank lines by default; a trace with fewer than
``min_steps`` such steps is split into single lines instead). Steps are refined in order, each
conditioned on the already refined prefix:

1. draw K candidates for step i from the same model at temperature 1.0, given prompt + prefix,
   stopping at the delimiter; keep those that end at the delimiter and are shorter (tokens);
2. for each, teacher-force the *original* continuation (the trace after step i, its first
   ``window`` tokens) after prompt + prefix + candidate, and after prompt + prefix + original step;
   the score is KL(P_original || P_candidate) of the next-token distributions, per position, averaged
   (``reduce: mean``, the default, which fits epsilon = 0.005) or summed over the window;
3. replace the step by the shortest candidate with KL < epsilon (ties: the lower KL); else keep it.

Candidates are drawn on the run's engine (``ctx.generator``: vllm where the run uses it) and scored
on the stage's engine (hf: the distributions need ``scoring``). The last step (the answer) has no
continuation to compare and is kept. Full-vocabulary KL comes from
:func:`thinkpress.kernels.kl_div`, chunk by chunk (``chunk_size`` positions): no [window, V]
probability tensor is built. The original context is teacher-forced in the same batch as the
candidates, so batching noise (bf16 padding) is the same on both sides of the comparison.

Traces are processed in journaled chunks (``traces_per_chunk``): a killed run resumes after the
last finished chunk. Stats: steps tried, shortened, candidates drawn and scored, tokens saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, field_validator

from thinkpress.api import (
    ComponentConfig,
    Engine,
    GenParams,
    Refiner,
    StageContext,
    TrainingSet,
    derive_seed,
    stable_hash,
)
from thinkpress.kernels import kl_div


class KLStepConfig(ComponentConfig):
    n_candidates: int = Field(default=64, ge=1, description="K candidates drawn per step (published: 64)")
    temperature: float = Field(default=1.0, gt=0.0, description="Candidate sampling temperature")
    epsilon: float = Field(default=0.005, gt=0.0, description="Accept a candidate when its window KL < epsilon")
    window: int = Field(default=512, ge=1, description="L: continuation tokens the KL is measured over")
    reduce: Literal["mean", "sum"] = Field(default="mean", description="Per-token mean or sum of the window KL")
    delimiter: str = Field(default="\n\n", description="Step separator")
    fallback_delimiter: str = Field(default="\n", description="Separator for traces with fewer than min_steps steps")
    min_steps: int = Field(default=3, ge=2, description="Fewer delimiter steps than this: split on fallback_delimiter")
    min_step_tokens: int = Field(default=4, ge=1, description="Steps shorter than this are kept as they are")
    max_step_tokens: int = Field(default=256, ge=1, description="Token limit for a candidate (longer steps are kept)")
    max_steps: int | None = Field(default=None, ge=1, description="Refine at most this many steps per trace")
    batch_size: int = Field(default=32, ge=1, description="Candidate sequences decoded together")
    kl_batch_size: int = Field(default=8, ge=1, description="Candidates teacher-forced together")
    chunk_size: int = Field(default=64, ge=1, description="Window positions per KL chunk")
    traces_per_chunk: int = Field(default=8, ge=1, description="Traces per journaled chunk (resume granularity)")

    @field_validator("delimiter", "fallback_delimiter")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return v


def split_steps(text: str, cfg: KLStepConfig) -> tuple[list[str], str]:
    """Steps of a trace and the delimiter that joins them back (``delimiter.join(steps) == text``)."""
    steps = text.split(cfg.delimiter)
    if len(steps) < cfg.min_steps:
        return text.split(cfg.fallback_delimiter), cfg.fallback_delimiter
    return steps, cfg.delimiter


def window_kl(engine: Engine, contexts: list[str], continuation: str, cfg: KLStepConfig) -> list[float]:
    """KL(P(. | contexts[0]) || P(. | contexts[j])) over the continuation window, for j >= 1."""
    total = torch.zeros(len(contexts) - 1)
    n = 0
    for logits, targets in engine.context_logits(contexts, continuation, max_tokens=cfg.window,
                                                 chunk_size=cfg.chunk_size):
        ref = logits[0]
        for j in range(1, len(contexts)):
            total[j - 1] += kl_div(ref, logits[j]).sum().cpu()
        n += len(targets)
    if n == 0:
        return [float("inf")] * (len(contexts) - 1)
    return (total / n if cfg.reduce == "mean" else total).tolist()


@dataclass
class TraceState:
    key: str
    prompt: str
    steps: list[str]
    delim: str
    original: str
    log: list[dict] = field(default_factory=list)

    def prefix(self, i: int) -> str:
        return "".join(s + self.delim for s in self.steps[:i])

    def text(self) -> str:
        return self.delim.join(self.steps)


class KLStepRefiner(Refiner):
    name = "kl-step"
    description = "Shorten each step to the shortest self-sampled candidate within a KL bound (TokenSqueeze)"
    Config = KLStepConfig
    requires = frozenset({"scoring"})  # context_logits: the window's next-token distributions

    def refine(self, data: TrainingSet, ctx: StageContext) -> TrainingSet:
        cfg = self.config
        engine = ctx.engine
        traces: dict[str, tuple[str, str]] = {}
        for e in data.examples:
            traces.setdefault(stable_hash(e.prompt, e.completion), (e.prompt, e.completion))
        for p in data.pairs:
            traces.setdefault(stable_hash(p.prompt, p.chosen), (p.prompt, p.chosen))
        items = [(k, pr, c) for k, (pr, c) in traces.items()]

        def run_chunk(chunk):
            return self._refine_traces(engine, chunk, ctx)

        recs = ctx.journal_map(items, run_chunk, chunk_size=cfg.traces_per_chunk, item_id=lambda t: t[0],
                               desc=f"refining {len(items)} traces")
        refined = {r["key"]: r for r in recs}
        st = ctx.stats
        for key in ("steps", "steps_tried", "steps_shortened", "candidates", "candidates_scored"):
            st[key] = sum(r[key] for r in recs)
        st["traces"] = len(recs)
        min_kls = sorted(k for r in recs for k in r["min_kls"])
        if min_kls:  # how far the best candidate of each scored step was from epsilon
            st["step_min_kl_p10_p50_p90"] = [min_kls[int(q * (len(min_kls) - 1))] for q in (0.1, 0.5, 0.9)]
        st["single_step_traces"] = sum(r["steps"] <= 1 for r in recs)
        st["traces_shortened"] = sum(r["steps_shortened"] > 0 for r in recs)
        orig = sum(engine.count_tokens(r["original"]) for r in recs)
        new = sum(engine.count_tokens(r["text"]) for r in recs)
        st.update(tokens_before=orig, tokens_after=new, tokens_saved=orig - new,
                  saved_fraction=(orig - new) / orig if orig else 0.0)
        if min_kls:
            ctx.log("lowest KL among a step's candidates, p10/p50/p90: "
                    + " / ".join(f"{k:.4f}" for k in st["step_min_kl_p10_p50_p90"]) + f" (epsilon {cfg.epsilon})")
        ctx.log(f"{st['steps_shortened']}/{st['steps_tried']} steps shortened in {st['traces_shortened']}/{len(recs)} "
                f"traces; {orig} -> {new} tokens ({st['saved_fraction']:.1%} saved); "
                f"{st['single_step_traces']} single-step traces skipped")

        def new_text(prompt: str, text: str) -> str:
            return refined[stable_hash(prompt, text)]["text"]

        examples = [e.model_copy(update={"completion": new_text(e.prompt, e.completion),
                                         "meta": {**e.meta, "refined_from_tokens": e.meta.get("n_tokens")}})
                    for e in data.examples]
        pairs = []
        for p in data.pairs:
            rec = refined[stable_hash(p.prompt, p.chosen)]
            pairs.append(p.model_copy(update={"chosen": rec["text"],
                                              "meta": {**p.meta, "steps_shortened": rec["steps_shortened"]}}))
        return TrainingSet(examples=examples, pairs=pairs)

    def _refine_traces(self, engine: Engine, chunk: list[tuple[str, str, str]], ctx: StageContext) -> list[dict]:
        cfg = self.config
        states = []
        for key, prompt, text in chunk:
            steps, delim = split_steps(text, cfg)
            states.append(TraceState(key=key, prompt=prompt, steps=steps, delim=delim, original=text))
        counts = {s.key: {"steps_tried": 0, "steps_shortened": 0, "candidates": 0, "candidates_scored": 0,
                          "min_kls": []} for s in states}
        max_round = max(len(s.steps) for s in states) - 1  # the last step has no continuation
        if cfg.max_steps is not None:
            max_round = min(max_round, cfg.max_steps)
        for i in range(max_round):
            todo = []
            for s in states:
                if i >= len(s.steps) - 1:
                    continue
                n_tok = engine.count_tokens(s.steps[i])
                if n_tok < cfg.min_step_tokens or n_tok > cfg.max_step_tokens:
                    continue
                todo.append((s, n_tok))
            if not todo:
                continue
            for delim in sorted({s.delim for s, _ in todo}):  # one stop string per generate call
                group = [(s, n) for s, n in todo if s.delim == delim]
                params = GenParams(max_new_tokens=max(n for _, n in group), temperature=cfg.temperature, stop=[delim])
                prompts = [s.prompt + s.prefix(i) for s, _ in group]
                seeds = [derive_seed(ctx.seed, s.key, i) for s, _ in group]
                # candidates are plain samples: drawn on the run's engine (e.g. vllm); scored on this stage's
                outs = ctx.generator.generate(prompts, params, n=cfg.n_candidates, seeds=seeds,
                                              batch_size=cfg.batch_size)
                for (s, n_tok), comps in zip(group, outs, strict=True):
                    c = counts[s.key]
                    c["steps_tried"] += 1
                    c["candidates"] += len(comps)
                    texts = {x.text for x in comps if x.finish_reason == "stop" and x.text.strip()}
                    cands = [(n, t) for n, t in sorted((engine.count_tokens(t), t) for t in texts) if n < n_tok]
                    best = self._best(engine, s, i, cands, c)
                    if best is not None:
                        s.log.append({"step": i, "from_tokens": n_tok, "to_tokens": best[0]})
                        s.steps[i] = best[1]
                        c["steps_shortened"] += 1
        return [{"key": s.key, "original": s.original, "text": s.text(), "steps": len(s.steps), "changes": s.log,
                 **counts[s.key]} for s in states]

    def _best(self, engine: Engine, s: TraceState, i: int, cands: list[tuple[int, str]], c: dict):
        """The shortest candidate under epsilon; candidates are scored shortest first, stopping at a hit."""
        cfg = self.config
        prefix = s.prompt + s.prefix(i)
        continuation = s.delim.join(s.steps[i + 1:])
        original = prefix + s.steps[i] + s.delim
        best_kl = float("inf")
        try:
            for b in range(0, len(cands), cfg.kl_batch_size):
                batch = cands[b : b + cfg.kl_batch_size]
                kls = window_kl(engine, [original] + [prefix + t + s.delim for _, t in batch], continuation, cfg)
                c["candidates_scored"] += len(batch)
                best_kl = min(best_kl, *kls)
                ok = [(n, kl, t) for (n, t), kl in zip(batch, kls, strict=True) if kl < cfg.epsilon]
                if ok:
                    n, _, t = min(ok)
                    return n, t
            return None
        finally:
            if cands:
                c["min_kls"].append(best_kl)
