"""TokenSkip scoring and pruning throughput (CoT tokens per second), self-information scorer.

    .venv/bin/python -m pytest benchmarks/test_tokenskip.py --benchmark-only -s
    BENCH_MODELS=smollm2-135m,qwen2.5-coder-0.5b ...

The CoTs are 16 GSM8K reference solutions (train split, ``<<...>>`` calculator notes removed) from
``../shared/data/gsm8k``. Scoring = one teacher-forced pass per trace (``Engine.token_scores``, the
LM head in 128-position chunks through ``thinkpress.kernels.token_scores``) at batch 1 and 16;
pruning = word aggregation + budget + rebuild at the five gammas, from the cached scores. Compare the
numbers only as ratios within one run.
"""

import json
import os
import re
import time
from pathlib import Path

import pytest

from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.models import ensure_embedded
from thinkpress.plugins.tokenskip.prune import prune_cot
from thinkpress.plugins.tokenskip.scorers import SelfInformationScorer

MODELS = os.environ.get("BENCH_MODELS", "smollm2-135m").split(",")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
GAMMAS = (0.9, 0.8, 0.7, 0.6, 0.5)
_engines: dict[str, HFEngine] = {}


def _engine(name):
    if name not in _engines:
        _engines[name] = HFEngine.from_pretrained(str(ensure_embedded(name)))
    return _engines[name]


def _cots(n=16):
    if not DATA.exists():
        pytest.skip(f"needs {DATA}")
    rows = [json.loads(line) for line, _ in zip(DATA.open(), range(n), strict=False)]
    return [r["question"] for r in rows], [re.sub(r"<<[^>]*>>", "", r["answer"].split("####")[0]).strip()
                                           for r in rows]


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("model", MODELS)
def test_self_information_scoring_and_pruning_tokens_per_s(benchmark, model, batch):
    engine = _engine(model)
    questions, cots = _cots()
    prompts = [engine.chat_prompt(q) for q in questions]
    scorer = SelfInformationScorer(engine=engine, batch_size=batch)
    n_tokens = sum(engine.count_tokens(c) for c in cots)

    def score():
        return scorer.score_batch(prompts, cots)

    scored = benchmark.pedantic(score, rounds=2, iterations=1, warmup_rounds=1)
    score_s = benchmark.stats.stats.min
    costs: dict[str, int] = {}

    def cost(w):
        if w not in costs:
            costs[w] = max(1, engine.count_tokens(" " + w))
        return costs[w]

    t0 = time.perf_counter()
    for cot, toks in zip(cots, scored, strict=True):
        for g in GAMMAS:
            prune_cot(cot, toks, g, force_tokens=["Step", ":"], keep_digits=True, cost=cost)
    prune_s = time.perf_counter() - t0
    benchmark.extra_info.update(model=model, batch=batch, cot_tokens=n_tokens,
                                scoring_tokens_per_s=n_tokens / score_s,
                                pruning_tokens_per_s=n_tokens * len(GAMMAS) / prune_s)
    print(f"\n{model} batch={batch}: {n_tokens} CoT tokens; scoring {n_tokens / score_s:.0f} tok/s; "
          f"pruning (5 gammas, cold word-cost cache) {n_tokens * len(GAMMAS) / prune_s:.0f} tok/s")
