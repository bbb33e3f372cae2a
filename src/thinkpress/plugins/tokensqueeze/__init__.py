"""Built-in ``tokensqueeze`` plugin: TokenSqueeze (NeurIPS 2025), Long2Short from self-generated data.

Stages (defaults first; the others are ablation variants, chosen with ``--set stages.<stage>=``):

* sampler ``self-sampler``: N graded samples per training problem at temperature 0.9;
* selector ``q-dyn``: adaptive-depth positives (k = ceil(alpha * (1 - p) * c) shortest correct),
  each paired with longer incorrect answers; variants ``shortest-correct``, ``fixed-quantile``,
  ``extra-positives`` (see :mod:`.select`);
* refiner ``kl-step``: distribution-aligned step refinement under a KL bound (see :mod:`.refine`);
* trainer ``dpo-l``: eta * DPO-L + (1 - eta) * SFT(chosen) on a LoRA policy (see :mod:`.dpo`).

See ``docs/tokensqueeze.md`` for every key, the command and measured numbers.
"""

from __future__ import annotations

from pydantic import Field

from thinkpress import hookimpl
from thinkpress.plugins.tokensqueeze.dpo import DPOLTrainer
from thinkpress.plugins.tokensqueeze.refine import KLStepRefiner
from thinkpress.plugins.tokensqueeze.select import SELECTORS
from thinkpress.toolkit.sampling import GradedSampler, SamplingConfig


class SelfSampler(GradedSampler):
    name = "self-sampler"
    description = "N self-samples per training problem at temperature 0.9, graded (TokenSqueeze step 1)"

    class Config(SamplingConfig):
        n: int = Field(default=8, ge=2, description="Samples per problem (N >= 2: p = c/N needs two)")
        temperature: float = Field(default=0.9, gt=0.0, description="Sampling temperature")
        top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold")
        max_new_tokens: int = Field(default=512, ge=1, description="Token limit per sample (longer: truncated, "
                                    "graded, usable as a rejected answer)")
        batch_size: int = Field(default=32, ge=1, description="Sequences decoded together")


@hookimpl
def register_samplers(register):
    register(SelfSampler)


@hookimpl
def register_selectors(register):
    for cls in SELECTORS:
        register(cls)




@hookimpl
def register_refiners(register):
    register(KLStepRefiner)


@hookimpl
def register_trainers(register):
    register(DPOLTrainer)


@hookimpl
def register_presets(register):
    register("smoke", {"components": {
        "self-sampler": {"n": 8, "max_new_tokens": 128, "batch_size": 64},
        "kl-step": {"n_candidates": 8, "window": 128, "max_steps": 4, "batch_size": 64},
        "dpo-l": {"epochs": 1, "batch_size": 2, "grad_accum": 2, "max_length": 256, "lr": 2e-4},
    }})
    # The main job's recipe (docs/tokensqueeze.md, "The default recipe"): trained on real, human-written
    # problems, and chosen on the validation split carved from GSM8K train, never on test. It is the
    # fixed-quantile variant of studies/tokensqueeze-ablation.yaml, the one variant there that kept the base
    # model's accuracy (34.0% vs. 31.0% at 11.3% fewer tokens; q-dyn, the paper's selector: 25.0% at 21.9%
    # fewer; shortest-correct: 18.0% at 29.6% fewer). 12 problems x 32 samples keeps sampling to 6-11 min on
    # 2 cores with vLLM, and N = 32 lets k exceed 1. No refiner: kl-step costs 3-5 min and saved 1.4-2.3% of
    # the positives' tokens, with no significant change on validation either with q-dyn or with this recipe
    # (studies/tokensqueeze-refiner.yaml: +1.0 points without it [-5, +7], 274 vs. 271 tokens); add it back
    # with --set stages.refiners=[kl-step]. The evaluation hands vLLM all of a test set's prompts at once
    # (chunk 320: 0.89x the time of chunks of 64 on GSM8K n = 300; a killed evaluation restarts that set).
    register("default", {"components": {
        "self-sampler": {"n": 32, "max_new_tokens": 400, "batch_size": 128},
        "fixed-quantile": {"max_pairs": 2, "quantile": 0.2},
        "q-dyn": {"max_pairs": 2},
        "shortest-correct": {"max_pairs": 2},
        "kl-step": {"n_candidates": 8, "batch_size": 64},
        "dpo-l": {"epochs": 1, "batch_size": 2, "grad_accum": 2, "max_length": 640, "lr": 5e-4},
    }})
    register("default", {
        "train_data": {"name": "gsm8k", "split": "train", "limit": 12, "shuffle": True},
        "stages": {"selector": "fixed-quantile", "refiners": []},
        "engine_options": {"vllm": {"cpu_kv_cache_gb": 3, "chunk_size": 320}},
    }, when_selected=True)
