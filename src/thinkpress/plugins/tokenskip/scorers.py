"""TokenSkip's token-importance scorers.

* ``self-information`` (default): ``-log p(token | question, CoT prefix)`` under a causal LM
  (LLMLingua-1 / Selective-Context): surprising tokens carry information, predictable ones can go;
* ``entropy``: entropy of the next-token distribution at the token's position (where the model
  was uncertain, the token that was written decided something);
* ``llmlingua2``: LLMLingua-2's token classifier (XLM-RoBERTa), ``P(keep)`` per token, through the
  ``llmlingua`` package; the published TokenSkip scorer. Needs the package and the classifier's
  weights on disk (or a Hub id where the Hub can be reached).

The causal-LM scorers use the run's model by default ("the model being trained") or the model named
in ``model``; both go through :meth:`thinkpress.core.engines.base.Engine.token_scores`, i.e.
``thinkpress.kernels.token_scores`` over chunks of the LM head's logits (never a [T, V] tensor for a
whole trace).
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar

from pydantic import Field

from thinkpress.api import ConfigError, ModelError, ScorerOptions, TokenList, TokenScorer, surfaces_from_offsets
from thinkpress.toolkit.models import load_scoring_engine


class CausalLMScorer(TokenScorer):
    """Scores from one teacher-forced pass of a causal LM over ``prompt + text``."""

    field: ClassVar[str] = "surprisal"
    run_engine_requires: ClassVar[frozenset[str]] = frozenset({"scoring"})

    class Options(ScorerOptions):
        model: str | None = Field(default=None, description="Causal LM that scores (embedded name, path or Hub "
                                  "id); default: the run's model")
        batch_size: int = Field(default=8, ge=1, description="Traces per forward pass")

    def __init__(self, ctx=None, *, engine=None, **options):
        """``engine`` (optional) scores instead of the run's model or ``options.model``."""
        super().__init__(ctx, **options)
        self._engine = engine

    @property
    def engine(self):
        if self._engine is None:
            if self.options.model is None:
                if self.ctx is None:
                    raise ConfigError(f"scorer {self.name!r}: no model (give options.model or run inside a stage)")
                self._engine = self.ctx.engine
            else:
                dtype = self.ctx.config.dtype if self.ctx is not None else "float32"
                self._engine = load_scoring_engine(self.options.model, dtype=dtype)
        return self._engine

    def score_batch(self, prompts: list[str], texts: list[str]) -> list[TokenList]:
        eng = self.engine
        stats = eng.token_scores(prompts, texts, batch_size=self.options.batch_size)
        out = []
        for text, ts in zip(texts, stats, strict=True):
            try:
                starts = eng.token_offsets(text)
            except ModelError as e:
                raise ConfigError(f"scorer {self.name!r}: {e}") from None
            vals = getattr(ts, self.field).tolist()
            if len(starts) != len(vals):
                raise RuntimeError(f"tokenization mismatch: {len(starts)} offsets for {len(vals)} scored tokens")
            out.append(list(zip(surfaces_from_offsets(text, starts), vals, strict=True)))
        return out


class SelfInformationScorer(CausalLMScorer):
    name = "self-information"
    description = "-log p of each token given the question and the CoT prefix, under a causal LM"
    field = "surprisal"


class EntropyScorer(CausalLMScorer):
    name = "entropy"
    description = "entropy of the next-token distribution at each token's position, under a causal LM"
    field = "entropy"


LLMLINGUA2_DEFAULT = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"


def keep_probabilities(model, tokenizer, texts: list[str], *, max_length: int = 512) -> list[TokenList]:
    """``P(keep)`` (class 1 of a 2-class token classifier) per token, as ``(surface, p)``.

    Texts longer than ``max_length`` tokens are scored in consecutive windows (as LLMLingua-2 does
    with its 512-token chunks). Special tokens get no score; their characters (none, for a
    well-formed tokenizer) go to the neighbouring token.
    """
    import torch

    out = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        probs: list[float] = []
        inner = max_length - 2
        for s in range(0, len(ids), inner):
            chunk = ids[s : s + inner]
            pre = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
            post = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
            x = torch.tensor([pre + chunk + post], device=model.device)
            with torch.inference_mode():
                logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
            p = torch.softmax(logits, dim=-1)[len(pre) : len(pre) + len(chunk), 1]
            probs += p.tolist()
        out.append(list(zip(surfaces_from_offsets(text, [a for a, _ in offs]), probs, strict=True)))
    return out


class LLMLingua2Scorer(TokenScorer):
    name = "llmlingua2"
    description = "LLMLingua-2 token classifier P(keep) (the llmlingua package; the published TokenSkip scorer)"

    class Options(ScorerOptions):
        model: str = Field(default=LLMLINGUA2_DEFAULT, description="LLMLingua-2 classifier: local path or Hub id")
        device: str = Field(default="cpu", description="Device map for the classifier")
        max_length: int = Field(default=512, ge=8, description="Tokens per classifier window")

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("llmlingua") is None:
            raise ConfigError("scorer 'llmlingua2' needs the 'llmlingua' package (pip install llmlingua) and the "
                              f"classifier weights ({LLMLINGUA2_DEFAULT}, or a local copy given with "
                              "scorer_options.model); or use the built-in 'self-information' or 'entropy' scorers")

    def __init__(self, ctx=None, **options):
        super().__init__(ctx, **options)
        self.check_available()
        from llmlingua import PromptCompressor

        try:
            comp = PromptCompressor(model_name=self.options.model, use_llmlingua2=True, device_map=self.options.device)
        except OSError as e:
            raise ConfigError(f"scorer 'llmlingua2': cannot load the classifier {self.options.model!r} ({e}). "
                              "Offline, download it once and pass its directory as scorer_options.model.") from None
        self.model, self.tokenizer = comp.model, comp.tokenizer

    def score_batch(self, prompts: list[str], texts: list[str]) -> list[TokenList]:
        # LLMLingua-2 scores the text alone (it is question-agnostic).
        return keep_probabilities(self.model, self.tokenizer, texts, max_length=self.options.max_length)


SCORERS = (SelfInformationScorer, EntropyScorer, LLMLingua2Scorer)
