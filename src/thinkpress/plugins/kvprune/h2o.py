"""H2O, Heavy-Hitter Oracle (Zhang et al. 2023).

Every cached token accumulates the attention it receives at every step (prefill: from every prompt
query, causally; decoding: from each new query), averaged over the query heads of its KV group.
Keeps the top ``budget * (1 - recent_ratio)`` tokens by accumulated score and the most recent
``budget * recent_ratio`` (half and half). Evicts every step by default (``buffer`` 0). Needs:
every query (captured each step, then dropped) and the keys.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from thinkpress import hookimpl
from thinkpress.kernels import window_attention_mass
from thinkpress.plugins.kvprune.base import BudgetConfig, BudgetTrigger, KVPress, Scorer, register_budget_presets


class H2OConfig(BudgetConfig):
    buffer: int = Field(default=0, ge=0, description="Evict when a row exceeds budget + buffer (0: every step)")
    sinks: int = Field(default=0, ge=0, description="First positions always kept (H2O has none; heavy hitters "
                       "usually include them)")
    window: int = Field(default=1, ge=1, description="Minimum recent entries always kept")
    recent_ratio: float = Field(default=0.5, gt=0.0, lt=1.0, description="Share of the budget kept as the most "
                                "recent tokens (the rest: heavy hitters)")


class H2OScorer(Scorer):
    every_query = True  # observe() consumes and clears the recorder every step

    def __init__(self, config):
        super().__init__(config)
        self.acc: list[torch.Tensor] = []

    def observe(self, press, cache, mask, prefill):
        qs = press.recorder.queries
        valid = mask.bool()
        if prefill:
            self.acc = []
        for li, layer in enumerate(cache.layers):
            k = layer.keys
            q = press.recorder.last(li)
            b, h, n, d = k.shape
            if prefill:
                acc = torch.zeros(b, h, n, device=k.device)
                for r in range(b):
                    c = int(valid[r].sum())
                    mass = window_attention_mass(q[r : r + 1, :, -c:], k[r : r + 1, :, -c:], causal=True)
                    acc[r, :, -c:] = mass[0] * c  # summed over the c prompt queries
                self.acc.append(acc)
                continue
            g = q.shape[1] // h
            sc = torch.einsum("bhgd,bhnd->bhgn", q.float().reshape(b, h, g, d), k.float()) / math.sqrt(d)
            sc = sc.masked_fill(~valid[:, None, None, :], float("-inf"))
            mass = torch.softmax(sc, dim=-1).mean(dim=2)
            self.acc[li] = torch.cat([self.acc[li], mass.new_zeros(b, h, 1)], dim=2) + mass
        qs.clear()

    def score(self, press, layer, keys, values, queries, positions, row):
        return self.acc[layer][row : row + 1, :, -keys.shape[2]:]

    def gather_state(self, layer, idx):
        self.acc[layer] = self.acc[layer].gather(-1, idx)

    def select_rows(self, idx):
        self.acc = [a.index_select(0, idx) for a in self.acc]


class H2OTrigger(BudgetTrigger):
    """The budget trigger with H2O's recent share: ``budget * recent_ratio`` recent tokens are kept."""

    def recent(self, press):
        return max(press.config.window, int(self.budget * press.config.recent_ratio))


class H2O(KVPress):
    name = "h2o"
    description = "H2O: accumulated attention (heavy hitters) + recent tokens"
    Config = H2OConfig
    scorer_cls = H2OScorer

    def make_trigger(self, params):
        return H2OTrigger(int(params.get("budget", self.config.budgets[0])), self.config.buffer)


@hookimpl
def register_pruners(register):
    register(H2O)


@hookimpl
def register_presets(register):
    register_budget_presets(register, "h2o", buffer=False)
