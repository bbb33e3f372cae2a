"""Built-in ``tokenskip`` plugin: TokenSkip (Xia et al. 2025), controllable CoT compression.

Stages:

* sampler ``greedy-sampler``: one greedy answer per training problem, graded;
* selector ``cot-filter``: correct answers up to ``max_tokens`` (500), CoT split from the answer line;
* trace pruner ``tokenskip``: token importance (a registered scorer) aggregated to words, the most
  important words kept to a fraction gamma of the tokens, one gamma drawn per example, ratio tag in
  the prompt (see :mod:`.prune`);
* trainer ``tokenskip-sft``: LoRA SFT on the pruned targets; the evaluation runs the trained model at
  every gamma and reports the actual ratio and adherence error (see :mod:`.train`).

Scorers (``register_scorers``): ``self-information`` (default), ``entropy``, ``llmlingua2``.
See ``docs/tokenskip.md`` for every key, the command and measured numbers.
"""

from __future__ import annotations

from thinkpress import hookimpl
from thinkpress.plugins.tokenskip.prune import TokenSkipPruner
from thinkpress.plugins.tokenskip.scorers import SCORERS
from thinkpress.plugins.tokenskip.select import CoTFilter, GreedySampler
from thinkpress.plugins.tokenskip.train import TokenSkipSFT


@hookimpl
def register_samplers(register):
    register(GreedySampler)


@hookimpl
def register_selectors(register):
    register(CoTFilter)


@hookimpl
def register_pruners(register):
    register(TokenSkipPruner)


@hookimpl
def register_trainers(register):
    register(TokenSkipSFT)


@hookimpl
def register_scorers(register):
    for cls in SCORERS:
        register(cls.name, cls)


@hookimpl
def register_presets(register):
    # One greedy answer per problem (SmolLM2 gets ~5% of one-step problems right): more problems.
    register("smoke", {
        "train_data": {"limit": 96},
        "components": {
            "greedy-sampler": {"max_new_tokens": 128, "batch_size": 48},
            "tokenskip-sft": {"epochs": 2, "batch_size": 4, "grad_accum": 1, "max_length": 256, "lr": 2e-4},
        },
    }, when_selected=True)
    register("default", {
        "train_data": {"limit": 96},
        # seven evaluated variants (one per gamma): smaller test sets than the preset's
        "test_data": [{"name": "gsm8k", "split": "test", "limit": 48, "shuffle": True},
                      {"name": "arith", "split": "test", "limit": 32}],
        "components": {
            "greedy-sampler": {"max_new_tokens": 320, "batch_size": 16},
            # measured: 2 epochs at lr 2e-4 (15 steps) learned no ratio control (actual ratio 0.95-0.97
            # at every gamma); see docs/tokenskip.md
            "tokenskip-sft": {"epochs": 3, "batch_size": 4, "grad_accum": 2, "max_length": 512, "lr": 5e-4},
        },
    }, when_selected=True)
