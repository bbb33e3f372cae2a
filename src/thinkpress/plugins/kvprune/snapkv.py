"""SnapKV (Li et al. 2024), windowed and re-applied during decoding.

Score of a cached key = the softmax attention it receives from the last ``obs_window`` (32) queries,
averaged over the window queries and the query heads of its KV group, then 1-D pooled (``kernel`` 7,
``pooling`` avg); top-k per KV head; the observation window itself is always kept. SnapKV compresses
the prompt once; here the same selection runs whenever a row exceeds ``budget + buffer``, so long
generations stay bounded. Needs: keys and the window's post-RoPE queries
(:func:`thinkpress.kernels.window_attention_mass`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from thinkpress import hookimpl
from thinkpress.kernels import window_attention_mass
from thinkpress.plugins.kvprune.base import BudgetConfig, KVPress, Scorer, register_budget_presets


class SnapKVConfig(BudgetConfig):
    obs_window: int = Field(default=32, ge=1, description="Observation window: the last queries whose attention "
                            "scores the cache (32-64 in the paper)")
    kernel: int = Field(default=7, ge=1, description="1-D pooling kernel over the scores (odd; 5-7 in the paper)")
    pooling: Literal["avg", "max"] = Field(default="avg", description="Pooling mode")

    def queries_needed(self) -> int:
        return self.obs_window


class SnapKVScorer(Scorer):
    def score(self, press, layer, keys, values, queries, positions, row):
        c = self.config
        return window_attention_mass(queries, keys, causal=True, pool_kernel=c.kernel, pool_mode=c.pooling)


class SnapKV(KVPress):
    name = "snapkv"
    description = "SnapKV: pooled attention from an observation window of recent queries"
    Config = SnapKVConfig
    scorer_cls = SnapKVScorer


@hookimpl
def register_pruners(register):
    register(SnapKV)


@hookimpl
def register_presets(register):
    register_budget_presets(register, "snapkv", buffer=True)
