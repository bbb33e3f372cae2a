"""Decode tokens/s and peak KV bytes: full cache vs. each KV policy, side by side in one run.

    .venv/bin/python -m pytest benchmarks/test_kv_decode.py --benchmark-only -s
    BENCH_MODELS=smollm2-135m,qwen2.5-coder-0.5b BENCH_KV_TOKENS=1024,2048 BENCH_KV_BUDGETS=128,256,512 \
    BENCH_KV_BATCH=1,8 BENCH_KV_POLICIES=full,rkv,snapkv,... (the whole matrix; hours on a 2-core CPU)

Defaults: SmolLM2-135M, 1,024 generated tokens (EOS ignored), budget 256, batch 1 and 8, every policy.
RPC takes no budget (period 1024, c = 4: one compression at the last step at 1,024 tokens). Each case
records tok/s, peak KV bytes (summed over the cache tensors) and their ratios to the full cache of the
same model, length and batch, measured earlier in the same session. Compare only within one run.
"""

import os

import pytest

from thinkpress.core.engines.base import GenParams, KVPolicy
from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.models import ensure_embedded
from thinkpress.core.plugins import build_registry


def _env(name, default):
    return os.environ.get(name, default).split(",")


MODELS = _env("BENCH_MODELS", "smollm2-135m")
TOKENS = [int(x) for x in _env("BENCH_KV_TOKENS", "1024")]
BUDGETS = [int(x) for x in _env("BENCH_KV_BUDGETS", "256")]
BATCHES = [int(x) for x in _env("BENCH_KV_BATCH", "1,8")]
POLICIES = _env("BENCH_KV_POLICIES", "full,streaming,h2o,snapkv,rkv,rpc,knorm,keydiff")
_engines: dict[str, HFEngine] = {}
_full: dict[tuple, dict] = {}
_reg = build_registry(load_entry_points=False)
QUESTION = ("A train leaves at 3 pm and travels 60 km per hour. A second train leaves the same station at 4 pm "
            "and travels 80 km per hour. When does the second train catch up? Think carefully, step by step.")


def _engine(name):
    if name not in _engines:
        _engines[name] = HFEngine.from_pretrained(str(ensure_embedded(name)))
    return _engines[name]


def _policy(name, budget, tokens):
    if name == "full":
        return KVPolicy()
    e = _reg.component("pruner", name)
    comp = e.cls(e.cls.Config() if name == "rpc" else e.cls.Config(budgets=[budget]))
    return comp.make_policy(comp.variants()[0])


CASES = [(m, t, b, p, bud) for m in MODELS for t in TOKENS for b in BATCHES for p in POLICIES
         for bud in ([0] if p in ("full", "rpc") else BUDGETS)]


@pytest.mark.parametrize("model, tokens, batch, policy, budget", CASES,
                         ids=[f"{m}-{t}tok-b{b}-{p}{'@' + str(bud) if bud else ''}" for m, t, b, p, bud in CASES])
def test_kv_decode(benchmark, model, tokens, batch, policy, budget):
    engine = _engine(model)
    prompts = [engine.chat_prompt(QUESTION)] * batch
    params = GenParams(max_new_tokens=tokens, ignore_eos=True)

    def run():
        engine.stats.reset()
        engine.generate(prompts, params, batch_size=batch, kv_policy=_policy(policy, budget, tokens))
        return engine.stats.decode_tokens_per_s, engine.stats.peak_kv_bytes

    tps, peak = benchmark.pedantic(run, rounds=1, iterations=1)
    info = {"decode_tokens_per_s": round(tps, 2), "peak_kv_bytes": peak, "evicted": engine.stats.kv_evicted}
    key = (model, tokens, batch)
    if policy == "full":
        _full[key] = info
    elif key in _full:
        info |= {"speed_vs_full": round(tps / _full[key]["decode_tokens_per_s"], 3),
                 "kv_vs_full": round(peak / _full[key]["peak_kv_bytes"], 3)}
    benchmark.extra_info.update(info)
    print(f"\n{model} {tokens} tok batch {batch} {policy}{'@' + str(budget) if budget else ''}: {info}")
    assert engine.stats.new_tokens == tokens * batch
