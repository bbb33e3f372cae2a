"""Token-importance scorers: the interface behind the ``register_scorers`` hook.

A scorer maps each token of a text to an importance score (higher = more important to keep). Trace
pruners (TokenSkip) aggregate these scores to words and drop the least important ones.

A registered scorer factory is called as ``factory(ctx, **options)`` with the pruner's
:class:`~thinkpress.core.context.StageContext` (for the run's engine, config and logging) and the
options from the pruner's ``scorer_options``. The built-in scorers are classes deriving from
:class:`TokenScorer`; they validate their options with a nested pydantic ``Options`` model, which
the pruner also uses to check the options before the run starts, and may define a classmethod
``check_available()`` that raises :class:`~thinkpress.core.errors.ConfigError` when something the
scorer needs (a package, a local model) is missing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from thinkpress.core.errors import ConfigError

if TYPE_CHECKING:
    from thinkpress.core.context import StageContext

TokenList = list[tuple[str, float]]
"""``[(surface, score), ...]``: the surfaces concatenate to exactly the scored text."""


class ScorerOptions(BaseModel):
    """Base of a scorer's ``Options``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TokenScorer(ABC):
    """Scores the tokens of a text given a prompt (the question it answers)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    run_engine_requires: ClassVar[frozenset[str]] = frozenset()
    """Engine capabilities the scorer uses when it scores with the run's own engine (no ``model`` option)."""

    class Options(ScorerOptions):
        pass

    def __init__(self, ctx: StageContext | None = None, **options):
        self.ctx = ctx
        self.options = self.Options.model_validate(options)

    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`ConfigError` when the scorer cannot run here (default: it always can)."""
        return None

    def score(self, prompt: str, text: str) -> TokenList:
        """``[(surface, score)]`` for the tokens of ``text``; the surfaces concatenate to ``text``."""
        return self.score_batch([prompt], [text])[0]

    @abstractmethod
    def score_batch(self, prompts: list[str], texts: list[str]) -> list[TokenList]:
        """:meth:`score` for many texts at once (batched where the scorer can)."""


def surfaces_from_offsets(text: str, starts: list[int]) -> list[str]:
    """Token surfaces that concatenate to ``text``, from each token's start offset.

    A token runs from its start to the next token's start, so whitespace a tokenizer leaves out of
    its offsets (``trim_offsets``) goes to the token before it; the first token starts at 0.
    Offsets must be non-decreasing.
    """
    if not starts:
        return [] if not text else [text]
    bounds = [0, *starts[1:], len(text)]
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=False)):
        raise ValueError("token offsets must be non-decreasing")
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def check_surfaces(text: str, tokens: TokenList, scorer: str) -> None:
    """The scorer contract: surfaces concatenate to the text; scores are finite."""
    joined = "".join(s for s, _ in tokens)
    if joined != text:
        raise ValueError(f"scorer {scorer!r} returned token surfaces that do not concatenate to the text "
                         f"({len(joined)} vs {len(text)} characters)")
    bad = [s for s, v in tokens if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise ValueError(f"scorer {scorer!r} returned non-finite scores for {len(bad)} token(s), e.g. {bad[0]!r}")


def validate_scorer(factory, name: str, options: dict, where: str) -> None:
    """Check a scorer's options and availability before a run starts (``where`` names the config key)."""
    opts_model = getattr(factory, "Options", None)
    if opts_model is not None:
        from pydantic import ValidationError

        from thinkpress.core.config import format_validation_error

        try:
            opts_model.model_validate(options)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, prefix=where)) from None
    check = getattr(factory, "check_available", None)
    if check is not None:
        check()
