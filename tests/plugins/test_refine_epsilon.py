"""The kl-step refiner's epsilon, on a trace whose answer is known by construction.

A duck-typed engine stands in for the model. A "token" is a word. Each step of the trace has a fixed list of sampled
candidates. The teacher-forced next-token distribution over a 2-token vocabulary depends only on the step that the
context ends with: p = (a, 1 - a) after the original step, q = (a + d, 1 - a - d) after a candidate with drift d, at
every position of the continuation. So a candidate's per-position KL(p || q) is computed here by hand (for a = 1/2:
-1/2 ln(1 - 4 d^2)), and the window mean equals it (the window sum is it times the number of window tokens).
"""

from __future__ import annotations

import math

import pytest
import torch

from thinkpress.core.config import build_config
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import Example, PreferencePair, TrainingSet
from thinkpress.core.engines.base import Completion
from thinkpress.core.plugins import build_registry
from thinkpress.core.store import RunStore
from thinkpress.plugins.tokensqueeze.refine import KLStepConfig, KLStepRefiner

DELIM = "\n\n"
PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples? Answer:"
STEPS = ["First we read the problem and note that Tom has three apples",  # 12 words
         "Then he buys four more apples at the store on the corner",  # 11
         "Adding them gives three plus four which equals seven apples",  # 10
         "The answer is 7"]  # the last step: never refined
# per step: (candidate text, finish reason, drift d)
CANDIDATES = {
    0: [("Tom has 3", "stop", 0.2),  # KL 0.0872: above epsilon
        ("Tom has three apples", "length", 0.0),  # did not end at the delimiter: never used
        ("So Tom has three apples", "stop", 0.03),  # KL 0.00180 \ same length, both below:
        ("So Tom holds three apples", "stop", 0.02),  # KL 0.00080 / the lower KL wins
        ("We note that Tom has three apples", "stop", 0.01),  # KL 0.00020, but longer
        ("First we read the problem and note that Tom has three apples now", "stop", 0.0)],  # not shorter
    1: [("He buys 4", "stop", 0.06),  # KL 0.00725: above
        ("He buys four more apples", "stop", 0.08)],  # KL 0.01296: above
    2: [("Adding gives seven", "stop", 0.052),  # KL 0.005437: just above epsilon
        ("3+4 makes 7 apples", "stop", 0.049),  # KL 0.004825: just below
        ("Three plus four is 7", "stop", 0.02)],  # KL 0.00080, but longer
}
EPSILON = 0.005
K = 6


def kl(d: float, a: float = 0.5) -> float:
    """KL((a, 1 - a) || (a + d, 1 - a - d)) by hand."""
    return a * math.log(a / (a + d)) + (1 - a) * math.log((1 - a) / (1 - a - d))


class FakeEngine:
    """What the refiner calls: count_tokens, generate (the candidates) and context_logits (the teacher forcing)."""

    def __init__(self, candidates, a):
        self.candidates, self.a = candidates, a
        self.drift = {s: 0.0 for s in STEPS}
        for cands in candidates.values():
            self.drift.update({t: d for t, _, d in cands})
        self.generate_prompts: list[str] = []
        self.scored: list[tuple[int, list[str], str, int | None]] = []  # (step, candidates, continuation, window)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts, params, *, n=1, seeds=None, batch_size=8, **kw):
        assert params.stop == [DELIM] and params.temperature == 1.0
        out = []
        for p in prompts:
            self.generate_prompts.append(p)
            cands = self.candidates[p.count(DELIM)]  # the prompt holds one delimiter per step before this one
            assert n == K  # K candidates asked for; this engine returns the step's fixed list (duplicates removed)
            out.append([Completion(text=t, token_ids=[0] * len(t.split()), finish_reason=f) for t, f, _ in cands])
        return out

    def context_logits(self, contexts, continuation, *, max_tokens=None, chunk_size=64):
        steps = [c.removeprefix(PROMPT).removesuffix(DELIM).split(DELIM)[-1] for c in contexts]  # the last step
        self.scored.append((len(contexts[0].split(DELIM)) - 2, steps[1:], continuation, max_tokens))
        n = len(continuation.split())
        n = min(n, max_tokens) if max_tokens is not None else n
        rows = torch.tensor([[math.log(self.a + self.drift[s]), math.log(1 - self.a - self.drift[s])] for s in steps])
        for c0 in range(0, n, chunk_size):
            m = min(chunk_size, n - c0)
            yield rows[:, None, :].expand(len(contexts), m, 2).clone(), torch.zeros(m, dtype=torch.long)


def _refine(tmp_path, candidates=CANDIDATES, a=0.5, **cfg):
    conf = build_config(preset="smoke", sets=[f"out={tmp_path / 'run'}"])
    state = RunState(conf, build_registry(load_entry_points=False), RunStore(tmp_path / "run", tmp_path / "c"),
                     UI(quiet=True))
    engine = FakeEngine(candidates, a)
    state._engines[(conf.engine, "")] = engine  # the run's engine: never loads a model
    ctx = StageContext(run=state, stage="refiner", component="kl-step", workdir=tmp_path / "work", key="k")
    trace = DELIM.join(STEPS)
    data = TrainingSet(examples=[Example(id="e", problem_id="a", prompt=PROMPT, completion=trace)],
                       pairs=[PreferencePair(id="p", problem_id="a", prompt=PROMPT, chosen=trace, rejected="no")])
    out = KLStepRefiner(KLStepConfig(n_candidates=K, **cfg)).refine(data, ctx)
    return out, ctx.stats, engine


def expected_steps(epsilon: float, window_tokens=None) -> list[str]:
    """The method by hand: per step, the shortest candidate that ended at the delimiter, is shorter than the step
    and has window KL < epsilon (ties: the lower KL); the window KL is the mean, or the sum over ``window_tokens``."""
    steps = list(STEPS)
    for i, cands in CANDIDATES.items():
        n_step = len(STEPS[i].split())
        ok = [(len(t.split()), kl(d) * (window_tokens or 1), t) for t, f, d in cands if f == "stop"]
        ok = [c for c in ok if c[0] < n_step and c[1] < epsilon]
        if ok:
            steps[i] = min(ok)[2]
    return steps


def test_the_design_straddles_epsilon():
    kls = {t: kl(d) for cands in CANDIDATES.values() for t, _, d in cands}
    assert kls["Adding gives seven"] > EPSILON > kls["3+4 makes 7 apples"]
    assert kls["So Tom has three apples"] < EPSILON and kls["So Tom holds three apples"] < EPSILON
    assert min(kls["He buys 4"], kls["He buys four more apples"]) > EPSILON


@pytest.mark.parametrize("epsilon, want", [
    # between "accept all" and "accept none": step 0 takes the lower-KL one of its two 5-word candidates under
    # epsilon (not the 3-word one above it, nor the 4-word one that was cut by the length limit), step 1 has no
    # candidate under epsilon, step 2 takes the 4-word candidate just under epsilon, not the 3-word one just above
    (EPSILON, ["So Tom holds three apples", STEPS[1], "3+4 makes 7 apples", STEPS[3]]),
    (1e9, ["Tom has 3", "He buys 4", "Adding gives seven", STEPS[3]]),  # accept all: the shortest candidates
    (1e-9, STEPS),  # accept none: the trace is kept
], ids=["between", "accept_all", "accept_none"])
def test_kl_step_rewrites_exactly_the_steps_with_a_shorter_candidate_under_epsilon(tmp_path, epsilon, want):
    assert expected_steps(epsilon) == want
    out, stats, engine = _refine(tmp_path, epsilon=epsilon)
    text = DELIM.join(want)
    assert out.examples[0].completion == text and out.pairs[0].chosen == text
    assert out.pairs[0].rejected == "no"
    changed = sum(a != b for a, b in zip(want, STEPS, strict=True))
    assert stats["steps_tried"] == 3 and stats["steps_shortened"] == changed
    assert stats["tokens_saved"] == sum(len(s.split()) for s in STEPS) - sum(len(s.split()) for s in want)
    # each step is sampled after the already refined prefix, and scored on the original continuation
    assert engine.generate_prompts == [PROMPT + "".join(s + DELIM for s in want[:i]) for i in range(3)]
    for step, _, continuation, window in engine.scored:
        assert continuation == DELIM.join(STEPS[step + 1:]) and window == 512


def test_kl_step_window_sum_bounds_the_total_kl_over_the_window(tmp_path):
    # reduce=sum over a 2-token window: each candidate's KL doubles. Step 2's 4-word candidate (0.0048 per token)
    # now fails and its 5-word one (0.0016) is taken; step 0 still takes "holds" (0.0016 < 0.0036 < epsilon).
    want = ["So Tom holds three apples", STEPS[1], "Three plus four is 7", STEPS[3]]
    assert expected_steps(EPSILON, window_tokens=2) == want
    out, stats, engine = _refine(tmp_path, epsilon=EPSILON, reduce="sum", window=2)
    assert out.examples[0].completion == DELIM.join(want) and stats["steps_shortened"] == 2
    assert {w for *_, w in engine.scored} == {2}


def test_kl_step_bounds_kl_from_the_original_to_the_candidate_not_the_reverse(tmp_path):
    # a peaked original distribution (0.9, 0.1) makes the two directions differ: at epsilon 0.0115 the 5-word
    # candidate passes only in the direction the refiner documents, KL(P_original || P_candidate), and the 4-word
    # one fails in both
    cands = {0: [("Tom has three apples", "stop", 0.05), ("So Tom has three apples", "stop", -0.05)], 1: [], 2: []}

    def reverse(d, a=0.9):
        return (a + d) * math.log((a + d) / a) + (1 - a - d) * math.log((1 - a - d) / (1 - a))

    assert kl(-0.05, 0.9) < 0.0115 < reverse(-0.05) and min(kl(0.05, 0.9), reverse(0.05)) > 0.0115
    out, stats, _ = _refine(tmp_path, candidates=cands, a=0.9, epsilon=0.0115)
    assert out.examples[0].completion == DELIM.join(["So Tom has three apples", *STEPS[1:]])
    assert stats["steps_shortened"] == 1


def test_candidates_are_drawn_on_the_run_engine_and_scored_on_the_stage_engine(tmp_path):
    """On vllm + hf runs the refiner samples on the run's engine (fast) and scores on its own (hf)."""
    conf = build_config(preset="smoke", sets=[f"out={tmp_path / 'run'}"])
    state = RunState(conf, build_registry(load_entry_points=False), RunStore(tmp_path / "run", tmp_path / "c"),
                     UI(quiet=True))
    sampler, scorer = FakeEngine(CANDIDATES, 0.5), FakeEngine(CANDIDATES, 0.5)
    state._engines[(conf.engine, "")] = sampler
    state._engines[("scoring-engine", "")] = scorer
    ctx = StageContext(run=state, stage="refiner", component="kl-step", workdir=tmp_path / "work", key="k",
                       engine_name="scoring-engine")
    trace = DELIM.join(STEPS)
    data = TrainingSet(examples=[Example(id="e", problem_id="a", prompt=PROMPT, completion=trace)])
    out = KLStepRefiner(KLStepConfig(n_candidates=K, epsilon=EPSILON)).refine(data, ctx)
    assert len(sampler.generate_prompts) == 3 and not scorer.generate_prompts and ctx.generator_used
    assert scorer.scored and not sampler.scored
    assert out.examples[0].completion == DELIM.join(expected_steps(EPSILON))
