"""The KV pruner base: scorer + selector + trigger, with physical eviction (kvpress style).

A policy module defines a :class:`PressConfig` subclass (its parameters and published defaults), a
:class:`Press` subclass (its scores) and a :class:`KVPress` component (the plugin's KV pruner).

How one batch is pruned (:class:`Press`):

* **State.** Per layer, the logical position of every cache slot ([B, Hkv, N]; -1 for masked
  slots), per row the number of real tokens seen and the prompt length; a query recorder when the
  scorer needs queries (see :mod:`.capture`).
* **Trigger** (per row, so a row's evictions do not depend on its batch neighbours): ``budget``
  (evict when a row holds more than ``budget + buffer`` real entries, down to ``budget``; buffer 0 =
  every step) or ``interval`` (every ``interval`` generated tokens, to a size the policy decides).
* **Scores** are computed per triggered row on its real entries only (they are the last ``count``
  slots of the row: masked slots are always at the front), so padding never leaks into pooling,
  softmaxes or means. Sinks (the first ``sinks`` positions), the recent ``window`` and, with
  ``protect_prompt``, the prompt are kept unconditionally.
* **Selector**: top-k per KV head (``per_head``) or one set per layer (scores averaged over heads),
  then a ``gather`` along the sequence: the tensors shrink. Kept entries stay in position order.
  Rows that keep fewer entries than the batch's new length get masked filler slots at the front.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from thinkpress.api import ComponentConfig, KVPolicy, KVPruner, ModelError
from thinkpress.plugins.kvprune.capture import QueryRecorder, capture_queries, check_capturable

log = logging.getLogger("thinkpress")


class PressConfig(ComponentConfig):
    """Parameters every policy has."""

    sinks: int = Field(default=4, ge=0, description="First positions (attention sinks) always kept")
    window: int = Field(default=32, ge=1, description="Most recent entries always kept")
    per_head: bool = Field(default=True, description="Top-k per KV head (True) or one set per layer (False)")
    protect_prompt: bool = Field(default=False, description="Never evict prompt entries")

    def queries_needed(self) -> int:
        """Post-RoPE queries the scorer reads (0: none); they must fit in ``window``."""
        return 0

    @model_validator(mode="after")
    def _check_window(self):
        qw = self.queries_needed()
        if qw and qw > self.window:
            raise ValueError(f"window ({self.window}) must hold the scorer's query window ({qw})")
        return self


class BudgetConfig(PressConfig):
    """A policy that keeps ``budget`` entries, evicting when a row exceeds ``budget + buffer``."""

    budgets: list[int] = Field(default=[128, 256], description="KV budgets (real entries kept per row, layer and "
                               "KV head); one evaluation variant per budget")
    buffer: int = Field(default=128, ge=0, description="Evict when a row exceeds budget + buffer (0: every step)")

    @model_validator(mode="after")
    def _check_budget(self):
        if not self.budgets:
            raise ValueError("budgets must name at least one budget")
        for b in self.budgets:
            if b <= self.window:
                raise ValueError(f"budget {b} must be larger than window ({self.window})")
            if b <= self.sinks:
                raise ValueError(f"budget {b} must be larger than sinks ({self.sinks})")
            if b < self.sinks + self.window:
                raise ValueError(f"budget {b} must hold sinks + window ({self.sinks} + {self.window})")
        return self


class Press(KVPolicy):
    """One policy instance for one budget; its state is reset by :meth:`begin` for every batch."""

    trigger: ClassVar[str] = "budget"  # or "interval"

    def __init__(self, config: PressConfig, budget: int, name: str):
        self.params = {"budget": budget}
        self.config = config
        self.budget = budget
        self.name = name
        self.needs_queries = bool(config.queries_needed())
        self.recorder: QueryRecorder | None = None

    # -- scores: what a policy overrides ---------------------------------------------------------
    def score_row(self, layer: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None,
                  positions: torch.Tensor, row: int) -> torch.Tensor:
        """Importance of batch row ``row``'s real entries: keys/values [1, H, n, D], queries [1, Hq, w, D]
        (the row's last w post-RoPE queries, w <= query window; the last w keys are theirs), positions
        [1, H, n]. Higher is kept. Returns [1, H, n]. Every policy defines it."""
        raise TypeError(f"{type(self).__name__} must define score_row")

    def target_size(self, row: int) -> int:
        """Entries a triggered row keeps (``budget`` unless the policy sizes itself)."""
        return self.budget

    def triggered(self, counts: torch.Tensor) -> torch.Tensor:
        """Which rows evict now, given their real entry counts [B]."""
        return counts > self.budget + getattr(self.config, "buffer", 0)

    def observe(self, cache: Any, mask: torch.Tensor, prefill: bool) -> None:
        """Called before the trigger on every step (H2O accumulates attention here)."""

    def gather_state(self, layer: int, idx: torch.Tensor) -> None:
        """Apply the selector's indices [B, H, N'] to per-slot policy state."""

    def extra_select_rows(self, idx: torch.Tensor) -> None:
        """Drop per-row policy state of finished rows."""

    # -- engine hooks ----------------------------------------------------------------------------
    def session(self, model: Any) -> AbstractContextManager:
        types = set(getattr(model.config, "layer_types", None) or [])
        if types - {"full_attention"}:
            raise ModelError(f"{type(model).__name__} has {sorted(types - {'full_attention'})} layers: KV policies "
                             "need full-attention layers (sliding-window caches already evict on their own)")
        if not self.needs_queries:
            self.recorder = None
            return nullcontext()
        check_capturable(model)
        self.recorder = QueryRecorder(self.recorder_window())
        return capture_queries(model, self.recorder)

    def recorder_window(self) -> int | None:
        return self.config.queries_needed()

    def begin(self, cache, attention_mask, prompt_lengths):
        mask = attention_mask
        b, n = mask.shape
        dev = mask.device
        self.prompt_len = torch.tensor(prompt_lengths, device=dev)
        self.lengths = self.prompt_len.clone()
        self.generated = 0
        pos = torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)
        self.positions = [pos[:, None, :].expand(b, layer.keys.shape[1], n).clone() for layer in cache.layers]
        self.observe(cache, mask, True)
        return self._compress(cache, mask)

    def after_step(self, cache, attention_mask, step):
        self.lengths = self.lengths + 1
        self.generated += 1
        new = (self.lengths - 1)[:, None, None]
        self.positions = [torch.cat([p, new.expand(p.shape[0], p.shape[1], 1)], dim=2) for p in self.positions]
        self.observe(cache, attention_mask, False)
        return self._compress(cache, attention_mask)

    def select_rows(self, idx):
        self.lengths = self.lengths.index_select(0, idx)
        self.prompt_len = self.prompt_len.index_select(0, idx)
        self.positions = [p.index_select(0, idx) for p in self.positions]
        if self.recorder is not None:
            self.recorder.select_rows(idx)
        self.extra_select_rows(idx)

    # -- selection -------------------------------------------------------------------------------
    def protected(self, positions: torch.Tensor, row: int) -> torch.Tensor:
        cur = int(self.lengths[row])
        keep = (positions < self.config.sinks) | (positions >= cur - self.config.window)
        if self.config.protect_prompt:
            keep |= positions < int(self.prompt_len[row])
        return keep

    def _compress(self, cache, mask: torch.Tensor) -> torch.Tensor:
        counts = mask.sum(-1)
        rows = self.triggered(counts)
        if not bool(rows.any()):
            return mask
        target = counts.clone()
        for r in rows.nonzero().flatten().tolist():
            c = int(counts[r])
            n_protected = int(self.protected(self.positions[0][r, 0, -c:], r).sum())
            target[r] = min(c, max(self.target_size(r), n_protected))
        if bool((target == counts).all()):
            return mask
        b, n = mask.shape
        new_n = int(target.max())
        trig = [r for r in rows.nonzero().flatten().tolist() if target[r] < counts[r]]
        qw = self.config.queries_needed()
        for li, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values
            h, d = keys.shape[1], keys.shape[3]
            score = torch.full((b, h, n), float("-inf"), device=keys.device)
            for r in range(b):
                c = int(counts[r])
                if r not in trig:
                    score[r, :, : n - c] = float("-inf")
                    score[r, :, n - c:] = torch.arange(c, device=keys.device, dtype=torch.float)  # keep all
                    continue
                sl = slice(n - c, n)
                pos = self.positions[li][r : r + 1, :, sl]
                q = None
                if qw:
                    q = self.recorder.last(li, min(qw, int(self.lengths[r])))[r : r + 1]
                s = self.score_row(li, keys[r : r + 1, :, sl], values[r : r + 1, :, sl], q, pos, r).float()
                if not self.config.per_head:
                    s = s.mean(dim=1, keepdim=True).expand_as(s)
                s = s.masked_fill(self.protected(pos, r), float("inf"))
                score[r, :, : n - c] = float("-inf")
                score[r, :, sl] = s[0]
            top = score.topk(new_n, dim=-1).indices  # [B, H, new_n], best first
            rank = torch.arange(new_n, device=keys.device)
            real = (rank[None, None, :] < target[:, None, None]).expand(b, h, new_n)  # each row's best `target` slots
            order = (top + real.long() * n).argsort(dim=-1)  # fillers first, then kept slots by position
            idx = top.gather(-1, order)
            real = real.gather(-1, order)
            gi = idx[..., None].expand(-1, -1, -1, d)
            layer.keys = keys.gather(2, gi)
            layer.values = values.gather(2, gi)
            self.positions[li] = torch.where(real, self.positions[li].gather(-1, idx), -1)
            self.gather_state(li, idx)
        new_mask = (torch.arange(new_n, device=mask.device)[None, :] >= (new_n - target)[:, None]).to(mask.dtype)
        return new_mask


class KVPress(KVPruner):
    """Base of the built-in KV pruners: one variant per budget, the budget-curve report."""

    press_cls: ClassVar[type[Press]] = Press

    def variants(self) -> list[dict[str, Any]]:
        return [{"budget": b} for b in self.config.budgets]

    def make_policy(self, params: dict[str, Any]) -> KVPolicy:
        budget = int(params.get("budget", self.config.budgets[0]))
        return self.press_cls(self.config, budget, self.name)

    def report_extras(self, rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
        from thinkpress.plugins.kvprune.report import budget_report

        return budget_report(self.name, rows, out_dir)


def register_budget_presets(register, policy: str, *, buffer: bool) -> None:
    """The presets' budgets for a budget policy, applied when the policy is selected.

    KV policies on short CPU answers: budgets (and R-KV/SnapKV's buffer) scaled down so that the
    policies evict at all (a few hundred tokens per answer, against 128-token buffers in the papers).
    """
    for preset, budgets, buf in (("smoke", [48, 96], 16), ("default", [64, 128], 32)):
        cfg: dict[str, Any] = {"budgets": budgets} | ({"buffer": buf} if buffer else {})
        register(preset, {"components": {policy: cfg}}, when_selected=True)
