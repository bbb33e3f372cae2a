"""KeyDiff (Park et al. 2025): keep the keys least similar to the mean key; score = -cos(k, mean k).

Distinctive keys carry information the others repeat. The mean is over the row's real keys of the
head. Cheap (no attention, no queries). Needs: keys.
"""

from __future__ import annotations

import torch

from thinkpress import hookimpl
from thinkpress.plugins.kvprune.base import BudgetConfig, KVPress, Scorer, register_budget_presets


class KeyDiffScorer(Scorer):
    def score(self, press, layer, keys, values, queries, positions, row):
        k = keys.float()
        anchor = k.mean(dim=2, keepdim=True)
        return -torch.nn.functional.cosine_similarity(k, anchor, dim=-1)


class KeyDiff(KVPress):
    name = "keydiff"
    description = "KeyDiff: keep keys unlike the mean key (score -cos(k, mean k))"
    Config = BudgetConfig
    scorer_cls = KeyDiffScorer


@hookimpl
def register_pruners(register):
    register(KeyDiff)


@hookimpl
def register_presets(register):
    register_budget_presets(register, "keydiff", buffer=True)
