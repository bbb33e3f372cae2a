"""KNorm (Devoto et al. 2024): keep the keys with the smallest L2 norm; score = -||k||.

Cheap (no attention, no queries): low-norm keys draw the most attention. Needs: keys.
"""

from __future__ import annotations

from thinkpress import hookimpl
from thinkpress.plugins.kvprune.base import BudgetConfig, KVPress, Press, register_budget_presets


class KNormPress(Press):
    def score_row(self, layer, keys, values, queries, positions, row):
        return -keys.float().norm(dim=-1)


class KNorm(KVPress):
    name = "knorm"
    description = "KNorm: keep low-norm keys (score -||k||)"
    Config = BudgetConfig
    press_cls = KNormPress


@hookimpl
def register_pruners(register):
    register(KNorm)


@hookimpl
def register_presets(register):
    register_budget_presets(register, "knorm", buffer=True)
