"""Engine interface: what the methods need from a generation backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from thinkpress.core.data import FinishReason
from thinkpress.core.errors import ModelError


class Capability(StrEnum):
    """What an engine can do beyond generating text (every engine generates).

    An engine declares its capabilities (``Engine.capabilities``, and the factory it registers carries
    the same set as ``factory.capabilities``), components and evaluation declare what they need, and a
    plan that needs what the chosen engine lacks is refused before any work, naming both.
    """

    SCORING = "scoring"
    """Teacher-forced log-probs of a given continuation: ``score``, ``token_scores``, ``iter_logits``,
    ``context_logits``, and ``token_offsets`` (where each of the engine's tokens starts in a text)."""
    FORCED_DECODE = "forced_decode"
    """``forced_decode``: log-probs of given tokens fed through the decode loop (under a KV policy)."""
    KV_POLICY = "kv_policy"
    """``generate(kv_policy=...)`` applies a decode-time KV-cache policy that evicts entries."""
    ADAPTERS = "adapters"
    """``with_adapter(path)``: the same model with a saved LoRA adapter on top, unmerged."""


@dataclass
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    """Decode to ``max_new_tokens`` whatever the model emits (throughput benchmarks)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    kv_kept_peak: float | None = None
    """Most cache entries this sequence held at once while decoding (from the cache a KV policy leaves after
    the prefill), over its full cache at the end (prompt + fed tokens); 1.0 without a policy, None where
    the engine does not count (vLLM)."""
    kv_kept_mean: float | None = None
    """Entries held, summed over its decode steps, over the full cache's entries summed the same way."""

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenStats:
    """Accumulated decoding statistics (the engine adds to them on every call)."""

    new_tokens: int = 0
    prompt_tokens: int = 0
    """Prompt tokens the engine read (once per prompt and sample)."""
    sequences: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_kv_bytes: int = 0
    steps: int = 0
    kv_evicted: int = 0
    """Cache entries (per layer and KV head, counted once per token) a KV policy removed."""

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def reset(self) -> None:
        self.__init__()


class KVPolicy:
    """Decode-time KV-cache policy hook. The base class keeps everything (no-op).

    The ``hf`` engine drives a policy through one batch like this::

        with policy.session(model):            # e.g. install query capture; checks that can refuse
            prefill
            mask = policy.begin(cache, mask, prompt_lengths)
            loop: [policy.select_rows(idx) when finished rows leave the batch]
                  forward one token (the mask gained a column of ones)
                  mask = policy.after_step(cache, mask, step)

    ``cache`` is the live ``DynamicCache`` (``layers[i].keys/.values`` [batch, kv_heads, len, dim],
    post-RoPE); ``mask`` the 2-D attention mask [batch, len] (left padding is 0). A policy that evicts
    must remove entries physically from every layer's keys and values and return the mask pruned
    with the same indices (every layer keeps the same number of entries per row; a row whose real
    entries are fewer than the new length fills the front with masked slots). The engine passes
    absolute position ids, so RoPE positions survive eviction.
    """

    name = "full"
    needs_queries = False

    def session(self, model: Any) -> AbstractContextManager:
        """Context for one batch's decode (default: nothing). Raise here to refuse a model before decoding."""
        return nullcontext()

    def begin(self, cache: Any, attention_mask: Any, prompt_lengths: list[int]) -> Any:
        return attention_mask

    def after_step(self, cache: Any, attention_mask: Any, step: int) -> Any:
        return attention_mask

    def select_rows(self, idx: Any) -> None:
        """Rows ``idx`` (a 1-D index tensor) stay in the batch, in that order: drop the others' state."""
        return None


ProgressFn = Callable[[int], None]


def _lacks(engine: Engine, cap: Capability) -> ModelError:
    return ModelError(f"engine {engine.name!r} does not provide {cap.value!r} (its capabilities: "
                      f"{', '.join(sorted(engine.capabilities)) or 'generation only'})")


class Engine(ABC):
    """A generation backend: ``chat_prompt``, ``generate`` and ``count_tokens``, plus the methods of
    the :class:`Capability` values it declares in ``capabilities`` (the others raise ``ModelError``).
    Implementations: ``hf`` (built in, all capabilities), ``fake`` (tests)."""

    name = "engine"
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    stats: GenStats

    def supports(self, cap: Capability) -> bool:
        return cap in self.capabilities

    def preferred_chunk(self, batch_size: int) -> int:
        """How many sequences to hand to one ``generate`` call (and to journal as one resumable chunk).

        Default: ``batch_size``. An engine that batches continuously (vllm) asks for more.
        """
        return batch_size

    @abstractmethod
    def chat_prompt(self, question: str, system: str | None = None, suffix: str = "") -> str:
        """The exact model input for a question (chat template applied, generation prompt added)."""

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        params: GenParams,
        *,
        n: int = 1,
        seeds: list[int] | None = None,
        kv_policy: KVPolicy | None = None,
        batch_size: int = 8,
        progress: ProgressFn | None = None,
        logprobs: bool = False,
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt. ``seeds[i]`` seeds prompt i's samples (resume-stable).

        ``logprobs=True`` fills each completion's per-token log-probs. An engine without
        :attr:`Capability.KV_POLICY` raises ``ModelError`` when given a ``kv_policy`` that is not the
        keep-everything base :class:`KVPolicy`.
        """

    def forced_decode(self, prompts: list[str], token_ids: list[list[int]], *, kv_policy: KVPolicy | None = None,
                      batch_size: int = 8) -> list[list[float]]:
        """Log-probabilities of given output tokens, decoded step by step under ``kv_policy``.

        Unlike :meth:`score` (one parallel pass, full attention), this feeds ``token_ids[i]`` one at a
        time through the decode loop, so a KV policy evicts exactly as it would while generating: the
        teacher-forced NLL of a full-cache output under a pruned cache.
        """
        raise _lacks(self, Capability.FORCED_DECODE)

    def score(self, prompts: list[str], continuations: list[str], *, batch_size: int = 4) -> list[list[float]]:
        """Teacher-forced per-token log-probabilities of each continuation given its prompt."""
        return [(-ts.surprisal).tolist() for ts in self.token_scores(prompts, continuations, batch_size=batch_size)]

    def token_scores(self, prompts: list[str], continuations: list[str], *, batch_size: int = 4) -> list[Any]:
        """Teacher-forced :class:`thinkpress.kernels.TokenScores` of each continuation's tokens.

        Row ``t`` describes continuation token ``t``: ``surprisal`` is ``-log p(token | prompt, prefix)``
        and ``entropy`` the entropy of the next-token distribution that predicts it (fp32, on CPU).
        Tokens are those of ``count_tokens`` (the continuation tokenized on its own). This generic
        version runs one pair at a time through :meth:`iter_logits`; engines override it with a batch.
        """
        import torch

        from thinkpress.kernels import TokenScores, token_scores

        out = []
        for prompt, cont in zip(prompts, continuations, strict=True):
            parts = [token_scores(lg, tg) for lg, tg in self.iter_logits(prompt, cont)]
            cat = [torch.cat([getattr(p, f) for p in parts]).cpu() if parts else torch.zeros(0)
                   for f in ("surprisal", "entropy", "lse")]
            out.append(TokenScores(*cat))
        return out

    def iter_logits(self, prompt: str, continuation: str, *, chunk_size: int = 128) -> Iterator[tuple[Any, Any]]:
        """Yield ``(logits[chunk, V], target_ids[chunk])`` over the continuation's positions, in chunks."""
        raise _lacks(self, Capability.SCORING)

    def token_offsets(self, text: str) -> list[int]:
        """Character offset where each of ``text``'s tokens starts (``text`` tokenized alone)."""
        raise _lacks(self, Capability.SCORING)

    def context_logits(self, contexts: list[str], continuation: str, *, max_tokens: int | None = None,
                       chunk_size: int = 64) -> Iterator[tuple[Any, Any]]:
        """Teacher-force the same ``continuation`` after each of ``contexts``.

        Yields ``(logits[len(contexts), chunk, V], target_ids[chunk])`` over the first ``max_tokens``
        continuation tokens (all when None), in chunks. This generic version runs one context at a
        time through :meth:`iter_logits`; engines override it with a batched pass.
        """
        import torch

        streams = [self.iter_logits(c, continuation, chunk_size=chunk_size) for c in contexts]
        seen = 0
        for parts in zip(*streams, strict=True):
            logits = torch.stack([lg for lg, _ in parts])
            targets = parts[0][1]
            if max_tokens is not None and seen + len(targets) > max_tokens:
                keep = max_tokens - seen
                logits, targets = logits[:, :keep], targets[:keep]
            if len(targets):
                yield logits, targets
            seen += len(targets)
            if max_tokens is not None and seen >= max_tokens:
                return

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of model tokens in ``text`` (no special tokens)."""

    def with_adapter(self, adapter_path: str) -> Engine:
        """An engine for base + the LoRA adapter at ``adapter_path`` (unmerged)."""
        raise _lacks(self, Capability.ADAPTERS)
