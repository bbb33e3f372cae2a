"""The KV pruner base: a scorer + a trigger, with physical eviction (kvpress style).

A policy module defines a :class:`PressConfig` subclass (its parameters and published defaults), a
:class:`Scorer` (its ``score``) and a :class:`KVPress` component naming them; a policy that evicts on
another schedule also gives its trigger (:class:`BudgetTrigger` is the default; RPC's is periodic).
:class:`Press` is the engine-facing policy that composes them.

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
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from thinkpress.api import ComponentConfig, KVPolicy, KVPruner, ModelError, TestSetResult
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


class Scorer:
    """Importance of a row's real cache entries, higher is kept: the one thing a new policy writes.

    ``score`` gets batch row ``row``'s real entries: keys/values [1, H, n, D], queries [1, Hq, w, D]
    (the row's last w post-RoPE queries when the config's ``queries_needed()`` is w > 0; the last w
    keys are theirs) and positions [1, H, n]; it returns [1, H, n]. A scorer that keeps state across
    steps (H2O's accumulated attention) also implements ``observe``, ``gather_state`` and
    ``select_rows``.
    """

    every_query: ClassVar[bool] = False
    """Whether the scorer reads every query of every step (not only the config's query window)."""

    def __init__(self, config: PressConfig):
        self.config = config

    def score(self, press: Press, layer: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None,
              positions: torch.Tensor, row: int) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define score")

    def observe(self, press: Press, cache: Any, mask: torch.Tensor, prefill: bool) -> None:
        """Called before the trigger on every step (prefill included)."""

    def gather_state(self, layer: int, idx: torch.Tensor) -> None:
        """Apply the selector's indices [B, H, N'] to per-slot state."""

    def select_rows(self, idx: torch.Tensor) -> None:
        """Keep the per-row state of rows ``idx`` only (finished rows left the batch)."""


class Trigger(ABC):
    """When a row evicts, how many entries it keeps, and which entries are never evicted."""

    params: dict[str, Any]
    """The evaluation variant's parameters (e.g. ``{"budget": 128}``)."""

    @abstractmethod
    def triggered(self, press: Press, counts: torch.Tensor) -> torch.Tensor:
        """Which rows evict now, given their real entry counts [B]."""

    @abstractmethod
    def target_size(self, press: Press, row: int) -> int:
        """Entries a triggered row keeps."""

    def recent(self, press: Press) -> int:
        """The most recent entries that are always kept."""
        return press.config.window

    def protected(self, press: Press, positions: torch.Tensor, row: int) -> torch.Tensor:
        """Sinks, the recent window and (``protect_prompt``) the prompt."""
        cur = int(press.lengths[row])
        keep = (positions < press.config.sinks) | (positions >= cur - self.recent(press))
        if press.config.protect_prompt:
            keep |= positions < int(press.prompt_len[row])
        return keep


class BudgetTrigger(Trigger):
    """Evict when a row holds more than ``budget + buffer`` real entries, down to ``budget``."""

    def __init__(self, budget: int, buffer: int = 0):
        self.budget, self.buffer = budget, buffer
        self.params = {"budget": budget}

    def triggered(self, press, counts):
        return counts > self.budget + self.buffer

    def target_size(self, press, row):
        return self.budget


class Press(KVPolicy):
    """One policy instance (a scorer and a trigger) for one variant; :meth:`begin` resets it per batch."""

    def __init__(self, config: PressConfig, scorer: Scorer, trigger: Trigger, name: str):
        self.config, self.scorer, self.trigger, self.name = config, scorer, trigger, name
        self.params = trigger.params
        self.needs_queries = bool(config.queries_needed()) or scorer.every_query
        self.recorder: QueryRecorder | None = None

    def score_row(self, layer: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None,
                  positions: torch.Tensor, row: int) -> torch.Tensor:
        return self.scorer.score(self, layer, keys, values, queries, positions, row)

    def protected(self, positions: torch.Tensor, row: int) -> torch.Tensor:
        return self.trigger.protected(self, positions, row)

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
        return None if self.scorer.every_query else self.config.queries_needed()  # None: observe() clears it

    def begin(self, cache, attention_mask, prompt_lengths):
        mask = attention_mask
        b, n = mask.shape
        dev = mask.device
        self.prompt_len = torch.tensor(prompt_lengths, device=dev)
        self.lengths = self.prompt_len.clone()
        self.generated = 0
        pos = torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)
        self.positions = [pos[:, None, :].expand(b, layer.keys.shape[1], n).clone() for layer in cache.layers]
        self.scorer.observe(self, cache, mask, True)
        return self._compress(cache, mask)

    def after_step(self, cache, attention_mask, step):
        self.lengths = self.lengths + 1
        self.generated += 1
        new = (self.lengths - 1)[:, None, None]
        self.positions = [torch.cat([p, new.expand(p.shape[0], p.shape[1], 1)], dim=2) for p in self.positions]
        self.scorer.observe(self, cache, attention_mask, False)
        return self._compress(cache, attention_mask)

    def select_rows(self, idx):
        self.lengths = self.lengths.index_select(0, idx)
        self.prompt_len = self.prompt_len.index_select(0, idx)
        self.positions = [p.index_select(0, idx) for p in self.positions]
        if self.recorder is not None:
            self.recorder.select_rows(idx)
        self.scorer.select_rows(idx)

    # -- selection -------------------------------------------------------------------------------
    def _compress(self, cache, mask: torch.Tensor) -> torch.Tensor:
        counts = mask.sum(-1)
        rows = self.trigger.triggered(self, counts)
        if not bool(rows.any()):
            return mask
        target = counts.clone()
        for r in rows.nonzero().flatten().tolist():
            c = int(counts[r])
            n_protected = int(self.protected(self.positions[0][r, 0, -c:], r).sum())
            target[r] = min(c, max(self.trigger.target_size(self, r), n_protected))
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
            self.scorer.gather_state(li, idx)
        new_mask = (torch.arange(new_n, device=mask.device)[None, :] >= (new_n - target)[:, None]).to(mask.dtype)
        return new_mask


class KVPress(KVPruner):
    """Base of the built-in KV pruners: a scorer and a trigger; by default one budget variant per budget."""

    scorer_cls: ClassVar[type[Scorer]] = Scorer

    def variants(self) -> list[dict[str, Any]]:
        return [{"budget": b} for b in self.config.budgets]

    def make_trigger(self, params: dict[str, Any]) -> Trigger:
        """The trigger of one variant (default: the variant's budget with the config's buffer)."""
        return BudgetTrigger(int(params.get("budget", self.config.budgets[0])), getattr(self.config, "buffer", 0))

    def make_policy(self, params: dict[str, Any]) -> KVPolicy:
        return Press(self.config, self.scorer_cls(self.config), self.make_trigger(params), self.name)

    def report_extras(self, result: TestSetResult, out_dir: Path) -> list[str]:
        from thinkpress.plugins.kvprune.report import budget_report

        return budget_report(self.name, result, out_dir)


KV_TEST_SETS = {"default": {"test_data": [{"name": "gsm8k", "split": "test", "limit": 48, "shuffle": True},
                                          {"name": "arith", "split": "test", "limit": 48}]}}
"""Each budget is a generation pass and a teacher-forced NLL pass per test set, so the default preset's
KV runs use smaller test sets than its 300 GSM8K problems."""


def register_budget_presets(register, policy: str, *, buffer: bool) -> None:
    """The presets' budgets for a budget policy, applied when the policy is selected.

    KV policies on short CPU answers: budgets (and R-KV/SnapKV's buffer) scaled down so that the
    policies evict at all (a few hundred tokens per answer, against 128-token buffers in the papers).
    """
    for preset, budgets, buf in (("smoke", [48, 96], 16), ("default", [64, 128], 32)):
        cfg: dict[str, Any] = {"budgets": budgets} | ({"buffer": buf} if buffer else {})
        register(preset, {"components": {policy: cfg}} | KV_TEST_SETS.get(preset, {}), when_selected=True)
