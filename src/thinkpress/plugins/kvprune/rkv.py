"""R-KV (Cai et al. 2025): redundancy-aware KV compression for reasoning models.

Over the candidate keys (all but the protected recent ``window``):

* importance ``A`` = mean attention from the last ``obs_window`` (alpha = 8) queries, max-pooled
  (``kernel`` 7);
* redundancy ``R`` = softmax over keys of each key's mean cosine similarity to the other keys
  (diagonal zeroed; each key's most recent highly similar copy, cos > ``threshold`` 0.5, exempted:
  :func:`thinkpress.kernels.key_redundancy`); ``threshold: null`` drops the exemption and uses the
  O(N*d) sum form;
* score = ``lam * A - (1 - lam) * R`` (lam 0.1; the code's default is 0.07).

Compresses when a row reaches ``budget + buffer`` (buffer 128). Needs: keys and the window queries.
"""

from __future__ import annotations

import torch
from pydantic import Field

from thinkpress import hookimpl
from thinkpress.kernels import key_redundancy, window_attention_mass
from thinkpress.plugins.kvprune.base import BudgetConfig, KVPress, Scorer, register_budget_presets


class RKVConfig(BudgetConfig):
    window: int = Field(default=8, ge=1, description="Most recent entries always kept (R-KV keeps its window)")
    obs_window: int = Field(default=8, ge=1, description="alpha: the last queries whose attention gives importance")
    kernel: int = Field(default=7, ge=1, description="Max-pooling kernel over the importance (odd)")
    lam: float = Field(default=0.1, ge=0.0, le=1.0, description="lambda: weight of importance vs. redundancy")
    threshold: float | None = Field(default=0.5, description="Cosine above which a key's most recent copy is exempted "
                                    "from its redundancy (null: no exemption, the O(N*d) form)")

    def queries_needed(self) -> int:
        return self.obs_window


class RKVScorer(Scorer):
    def score(self, press, layer, keys, values, queries, positions, row):
        c = self.config
        n = keys.shape[2]
        cand = max(n - c.window, 1)
        imp = window_attention_mass(queries, keys, causal=True, pool_kernel=c.kernel, pool_mode="max")
        red = torch.softmax(key_redundancy(keys[:, :, :cand], exemption_threshold=c.threshold), dim=-1)
        score = c.lam * imp
        score[:, :, :cand] -= (1 - c.lam) * red
        return score


class RKV(KVPress):
    name = "rkv"
    description = "R-KV: attention importance minus key redundancy (reasoning models)"
    Config = RKVConfig
    scorer_cls = RKVScorer


@hookimpl
def register_pruners(register):
    register(RKV)


@hookimpl
def register_presets(register):
    register_budget_presets(register, "rkv", buffer=True)
