"""KNorm (Devoto et al. 2024): keep the keys with the smallest L2 norm; score = -||k||.

Cheap (no attention, no queries): low-norm keys draw the most attention. Needs: keys.
"""

from __future__ import annotations

from thinkpress import hookimpl
from thinkpress.plugins.kvprune.base import BudgetConfig, KVPress, Scorer, register_budget_presets


class KNormScorer(Scorer):
    def score(self, press, layer, keys, values, queries, positions, row):
        return -keys.float().norm(dim=-1)


class KNorm(KVPress):
    name = "knorm"
    description = "KNorm: keep low-norm keys (score -||k||)"
    Config = BudgetConfig
    scorer_cls = KNormScorer


@hookimpl
def register_pruners(register):
    register(KNorm)


@hookimpl
def register_presets(register):
    register_budget_presets(register, "knorm", buffer=True)
