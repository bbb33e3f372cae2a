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
