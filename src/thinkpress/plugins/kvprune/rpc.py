"""RPC, Reasoning Path Compression (Song et al. 2025).

Every ``period`` (P = 1024) generated tokens, score the cache with the last ``obs_window`` (R = 32)
queries (attention averaged over heads, pooled with ``kernel`` 7) and keep, besides the prompt
(never compressed), ``P / ratio`` generated tokens per period so far plus the last R. One evaluation
variant per compression ratio ``c`` (4). Needs: keys and the window queries.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from thinkpress import hookimpl
from thinkpress.plugins.kvprune.base import KV_TEST_SETS, KVPress, PressConfig, Trigger
from thinkpress.plugins.kvprune.snapkv import SnapKVScorer


class RPCConfig(PressConfig):
    period: int = Field(default=1024, ge=2, description="P: compress every P generated tokens")
    ratios: list[int] = Field(default=[4], description="c: keep P/c tokens per period; one variant per ratio")
    obs_window: int = Field(default=32, ge=1, description="R: the last queries that score the cache (always kept)")
    window: int = Field(default=32, ge=1, description="Most recent entries always kept (R)")
    kernel: int = Field(default=7, ge=1, description="Pooling kernel over the scores (odd)")
    pooling: Literal["avg", "max"] = Field(default="avg", description="Pooling mode")
    per_head: bool = Field(default=False, description="RPC averages the scores over heads: one set per layer")
    protect_prompt: bool = Field(default=True, description="RPC never compresses the prompt")

    def queries_needed(self) -> int:
        return self.obs_window

    @model_validator(mode="after")
    def _check_ratios(self):
        if not self.ratios:
            raise ValueError("ratios must name at least one compression ratio")
        for c in self.ratios:
            if c < 1 or self.period // c < 1:
                raise ValueError(f"ratio {c} must be >= 1 and at most period ({self.period})")
        if self.obs_window >= self.period:
            raise ValueError(f"obs_window ({self.obs_window}) must be smaller than period ({self.period})")
        return self


class PeriodTrigger(Trigger):
    """Every ``period`` generated tokens, keep the prompt, ``period / ratio`` tokens per period so far and the
    last ``obs_window``."""

    def __init__(self, period: int, ratio: int, obs_window: int):
        self.period, self.ratio, self.obs_window = period, ratio, obs_window
        self.params = {"ratio": ratio}

    def triggered(self, press, counts):
        due = press.generated > 0 and press.generated % self.period == 0
        return counts.new_full(counts.shape, due, dtype=bool)

    def target_size(self, press, row):
        periods = press.generated // self.period
        return int(press.prompt_len[row]) + periods * (self.period // self.ratio) + self.obs_window


class RPC(KVPress):
    name = "rpc"
    description = "RPC: periodic compression of the reasoning path, prompt kept"
    Config = RPCConfig
    scorer_cls = SnapKVScorer  # SnapKV's pooled window attention (kernel, pooling) on a period trigger

    def variants(self) -> list[dict[str, Any]]:
        return [{"ratio": c} for c in self.config.ratios]

    def make_trigger(self, params: dict[str, Any]) -> Trigger:
        c = self.config
        return PeriodTrigger(c.period, int(params.get("ratio", c.ratios[0])), c.obs_window)


@hookimpl
def register_pruners(register):
    register(RPC)


@hookimpl
def register_presets(register):
    # RPC compresses every `period` tokens (1024 in the paper): scaled to a few-hundred-token answer.
    register("smoke", {"components": {"rpc": {"period": 32, "ratios": [2], "obs_window": 8, "window": 8}}},
             when_selected=True)
    register("default", {"components": {"rpc": {"period": 64, "ratios": [2, 4], "obs_window": 16, "window": 16}}}
             | KV_TEST_SETS["default"], when_selected=True)
