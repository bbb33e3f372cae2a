"""Stage base classes: the fixed signatures of the five stages.

A method component is a class with a ``name``, a nested pydantic ``Config`` (``extra="forbid"``,
every field described) and the one method of its stage's base class. The pipeline instantiates it
with its validated config (``Component(config)``) and calls the method with the stage input and a
:class:`~thinkpress.core.context.StageContext`.

Stages, in order: sampler -> selector -> refiner* -> trace pruner* -> trainer; KV pruners are used
by the engine while decoding (in evaluation, and in sampling when configured).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from thinkpress.core.data import Problem, Sample, TrainingSet, TrainResult

if TYPE_CHECKING:
    from thinkpress.core.context import StageContext
    from thinkpress.core.engines.base import KVPolicy
    from thinkpress.core.results import TestSetResult

STAGES = ("sampler", "selector", "refiner", "pruner", "trainer")
SINGLE_STAGES = ("sampler", "selector", "trainer")
"""Stages with exactly one component per run (the others chain)."""


EVAL_ONLY: dict[str, Any] = {"eval_only": True}
"""``json_schema_extra`` of a config field that changes only how the result is evaluated (e.g. which variants),
not what the stage produces: such a field is left out of the stage's cache key, so setting it reuses the trained
stage. Example: ``Field(default=None, description=..., json_schema_extra=EVAL_ONLY)``. Mark a field when it is
added: marking an existing field changes the keys of stages already cached."""


class ComponentConfig(BaseModel):
    """Base of every component's ``Config``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def key_dump(self) -> dict[str, Any]:
        """The config as it enters the stage's cache key: every field except those marked :data:`EVAL_ONLY`."""
        skip = {n for n, f in type(self).model_fields.items()
                if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("eval_only")}
        return self.model_dump(mode="json", exclude=skip)


class Component(ABC):  # noqa: B024 - the stage bases declare the abstract method
    """Base of every stage component."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    description: ClassVar[str] = ""

    class Config(ComponentConfig):
        pass

    def __init__(self, config: ComponentConfig | None = None):
        self.config = config if config is not None else self.Config()

    requires: ClassVar[frozenset[str]] = frozenset()
    """Engine capabilities this component uses (values of :class:`~thinkpress.core.engines.base.Capability`)."""

    def requirements(self) -> frozenset[str]:
        """The engine capabilities this configured component needs (default: ``requires``)."""
        return self.requires

    def check(self, registry: Any) -> None:
        """Check what the config names beyond its own keys (e.g. a scorer) before the run starts.

        Called by the pipeline for every planned component with the plugin registry; raise
        :class:`~thinkpress.core.errors.ConfigError` naming the key path. Default: nothing to check.
        """
        return None

    def check_plan(self, plan: Any) -> None:
        """Check this component's config against the other components of the run, before the run starts.

        Called once per planned component after every component's :meth:`check`, with the
        :class:`~thinkpress.core.planning.Plan` (its ``sampler``, ``selector``, ``refiners``,
        ``trace_pruners``, ``trainer`` and ``kv_pruners`` hold the planned components as ``.instance``).
        Raise :class:`~thinkpress.core.errors.ConfigError` naming the key path (e.g. a trainer asked to
        evaluate a ratio its pruner does not train). Default: nothing to check.
        """
        return None

    def report_extras(self, result: TestSetResult, out_dir: Path) -> list[str]:
        """Add method-specific metrics to the evaluation rows and files under ``out_dir``.

        Called once after evaluation for the trainer and every KV pruner of the run, with the primary
        test set's typed result: each ``VariantResult`` holds its ``variant`` (name, params, reference)
        and its metrics ``row``, to which new keys may be added in place (never renaming report.json's
        contract keys). Returns Markdown lines for ``report.md`` (default: none).
        """
        return []

    def eval_variants(self, ctx: StageContext) -> list[EvalVariant] | None:
        """Evaluation variants this component adds (trainers: how to evaluate the trained model).

        ``None`` means the default (one variant named ``trained`` when an adapter was produced).
        """
        return None


@dataclass
class EvalVariant:
    """One row of the evaluation: a model (base or base + adapter), a prompt and a KV policy."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    prompt_suffix: str = ""
    """Text appended to the question in the user turn (e.g. a TokenSkip ratio tag)."""
    response_prefix: str = ""
    """Text the model's turn starts with: fed after the generation prompt, not generated and not counted
    (e.g. a TokenSkip ratio tag with ``tag_position: response``)."""
    kv_pruner: str | None = None
    kv_params: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    reference: str | None = None
    """The variant this one is compared with (accuracy change, lost/gained); None: ``base``."""


class Sampler(Component):
    """Stage 1: generates completions for the training problems and grades them."""

    stage = "sampler"

    @abstractmethod
    def sample(self, problems: list[Problem], ctx: StageContext) -> list[Sample]:
        """Generate and grade completions for ``problems``."""
        ...


class Selector(Component):
    """Stage 2: turns graded samples into a training set (SFT examples and/or preference pairs)."""

    stage = "selector"

    @abstractmethod
    def select(self, samples: list[Sample], problems: list[Problem], ctx: StageContext) -> TrainingSet:
        """Turn graded samples into SFT examples and/or preference pairs."""
        ...


class Refiner(Component):
    """Stage 3 (zero or more, in order): rewrites the reasoning in the training set."""

    stage = "refiner"

    @abstractmethod
    def refine(self, data: TrainingSet, ctx: StageContext) -> TrainingSet:
        """Rewrite the reasoning of the training set."""
        ...


class TracePruner(Component):
    """A pruner that removes tokens from training examples."""

    stage = "pruner"
    kind: ClassVar[str] = "trace"

    @abstractmethod
    def prune(self, data: TrainingSet, ctx: StageContext) -> TrainingSet:
        """Return the training set with tokens removed from the reasoning."""
        ...


class KVPruner(Component):
    """A pruner that is a decode-time KV-cache policy, applied by the engine while generating."""

    stage = "pruner"
    kind: ClassVar[str] = "kv"
    requires: ClassVar[frozenset[str]] = frozenset({"kv_policy"})

    def variants(self) -> list[dict[str, Any]]:
        """Parameter sets to evaluate (e.g. one per budget); each becomes one evaluation variant."""
        return [{}]

    @abstractmethod
    def make_policy(self, params: dict[str, Any]) -> KVPolicy:
        """Build the cache policy for one variant's parameters."""
        ...


class Trainer(Component):
    """Stage 5: trains an adapter on the training set and may add evaluation variants."""

    stage = "trainer"

    @abstractmethod
    def train(self, data: TrainingSet, ctx: StageContext) -> TrainResult:
        """Train on the training set; save the adapter under ``ctx.workdir``."""
        ...


STAGE_BASES: dict[str, tuple[type[Component], ...]] = {
    "sampler": (Sampler,),
    "selector": (Selector,),
    "refiner": (Refiner,),
    "pruner": (TracePruner, KVPruner),
    "trainer": (Trainer,),
}
