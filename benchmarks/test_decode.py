"""Greedy decode throughput of the hf engine, batch 1 vs batch 8, on the embedded models.

    .venv/bin/python -m pytest benchmarks/test_decode.py --benchmark-only -s
    BENCH_MODELS=smollm2-135m,qwen2.5-coder-0.5b BENCH_TOKENS=128 ...

Each case decodes a fixed number of new tokens (EOS ignored by a stop-free prompt is not guaranteed,
so the count of tokens actually generated is what tok/s divides by). Compare cases only as ratios
within one run: the machines are shared and noisy.
"""

import os

import pytest

from thinkpress.core.datasets import load_arith
from thinkpress.core.engines.base import GenParams
from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.models import ensure_embedded

MODELS = os.environ.get("BENCH_MODELS", "smollm2-135m").split(",")
TOKENS = int(os.environ.get("BENCH_TOKENS", "128"))
_engines: dict[str, HFEngine] = {}


def _engine(name):
    if name not in _engines:
        _engines[name] = HFEngine.from_pretrained(str(ensure_embedded(name)))
    return _engines[name]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", MODELS)
def test_greedy_decode_tokens_per_s(benchmark, model, batch):
    engine = _engine(model)
    prompts = [engine.chat_prompt(p.question) for p in load_arith("test", limit=batch)]

    def run():
        engine.stats.reset()
        engine.generate(prompts, GenParams(max_new_tokens=TOKENS), batch_size=batch)
        return engine.stats.new_tokens, engine.stats.decode_s

    tokens, decode_s = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(model=model, batch=batch, new_tokens=tokens, decode_tokens_per_s=tokens / decode_s)
    print(f"\n{model} batch={batch}: {tokens} tokens, {tokens / decode_s:.1f} decode tok/s")
