"""StreamingLLM (Xiao et al. 2024): keep the attention sinks and the most recent tokens. No scoring.

Keeps ``sinks`` (4) + the most recent ``budget - sinks`` entries. Evicts every step by default
(``buffer`` 0, a rolling cache); a buffer evicts in chunks (fewer copies, a slightly larger peak).
Needs: positions only.
"""

from __future__ import annotations

from pydantic import Field

from thinkpress import hookimpl
from thinkpress.plugins.kvprune.base import BudgetConfig, KVPress, Scorer, register_budget_presets


class StreamingConfig(BudgetConfig):
    buffer: int = Field(default=0, ge=0, description="Evict when a row exceeds budget + buffer (0: every step)")
    window: int = Field(default=1, ge=1, description="Most recent entries always kept (recency is the score)")


class StreamingScorer(Scorer):
    def score(self, press, layer, keys, values, queries, positions, row):
        return positions.float()  # the most recent win


class Streaming(KVPress):
    name = "streaming"
    description = "StreamingLLM: attention sinks + the most recent tokens"
    Config = StreamingConfig
    scorer_cls = StreamingScorer


@hookimpl
def register_pruners(register):
    register(Streaming)


@hookimpl
def register_presets(register):
    register_budget_presets(register, "streaming", buffer=False)
