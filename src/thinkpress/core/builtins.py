"""The core's own hook implementations: the ``hf`` engine, the datasets, the base presets, ``run_stage``."""

from __future__ import annotations

from thinkpress import hookimpl
from thinkpress.core.datasets import BUILTIN_DATASETS


@hookimpl
def register_engines(register):
    from thinkpress.core.engines.hf import build_hf_engine
    from thinkpress.core.engines.vllm import build_vllm_engine

    register("hf", build_hf_engine)
    register("vllm", build_vllm_engine)


@hookimpl
def register_datasets(register):
    for name, loader in BUILTIN_DATASETS.items():
        register(name, loader)


@hookimpl
def register_presets(register):
    # SmolLM2-135M, a handful of one-step problems: the whole pipeline in minutes on 2 cores.
    # SmolLM2 solves only ~5-10% of them and ignores the \boxed{} instruction, so the smoke preset
    # drops the system prompt (its own default reads better).
    # The hf engine: smoke runs generate a few thousand tokens, less than vLLM's start-up costs.
    register("smoke", {
        "model": "smollm2-135m",
        "engine": "hf",
        "system_prompt": None,
        "train_data": {"name": "arith", "split": "train", "limit": 16, "difficulty": [1]},
        "test_data": [{"name": "arith", "split": "test", "limit": 16, "difficulty": [1]}],
        "eval": {"generation": {"max_new_tokens": 128, "batch_size": 16}},
    })
    # Qwen2.5-Coder-0.5B, the embedded default. Every method is evaluated on real, human-written problems (a
    # seeded 300 of GSM8K test, shipped with the package) next to 48 generated ones: in-distribution numbers
    # alone mislead. Methods train on 32 generated arith problems unless their plugin says otherwise
    # (tokensqueeze, the README's main job, trains on GSM8K train; see its presets).
    # The token cap: the base model's GSM8K answers average ~290 tokens and 6% run past 512
    # (n = 300, greedy), so 600 cuts off about 5% of them. Batch 16: the hf engine on 2 cores decoded 48
    # GSM8K prompts x 128 tokens at 115 tokens/s at batch 16, 117 at 24, 73 at 32 and 41 at 48.
    register("default", {
        "model": "qwen2.5-coder-0.5b",
        "train_data": {"name": "arith", "split": "train", "limit": 32},
        "test_data": [{"name": "gsm8k", "split": "test", "limit": 300, "shuffle": True},
                      {"name": "arith", "split": "test", "limit": 48}],
        "eval": {"generation": {"max_new_tokens": 600, "batch_size": 16}},
    })


@hookimpl(trylast=True)
def run_stage(stage, component, inputs, ctx):
    """Call the component's stage method (the innermost implementation)."""
    if stage == "sampler":
        return component.sample(inputs["problems"], ctx)
    if stage == "selector":
        return component.select(inputs["samples"], inputs["problems"], ctx)
    if stage == "refiner":
        return component.refine(inputs["data"], ctx)
    if stage == "pruner":
        return component.prune(inputs["data"], ctx)
    if stage == "trainer":
        return component.train(inputs["data"], ctx)
    raise ValueError(f"unknown stage {stage!r}")
