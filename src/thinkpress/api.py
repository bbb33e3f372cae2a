"""The public API: the one module a plugin imports (with :mod:`thinkpress.toolkit` and :mod:`thinkpress.kernels`).

Everything a method needs to plug into the five stages is here: the records that flow between
stages, the stage base classes, the context a stage runs in, the engine interface, the hook marker,
errors, grading, and helpers for reports and files. Names not listed in ``__all__`` (and anything
under ``thinkpress.core``) may change without notice. docs/api.md documents each name; a test
checks that every name here has a docstring and appears there.
"""

from thinkpress import hookimpl
from thinkpress.core.context import StageContext
from thinkpress.core.data import (
    Example,
    Prediction,
    PreferencePair,
    Problem,
    Sample,
    TrainingSet,
    TrainResult,
    read_jsonl,
    write_jsonl,
)
from thinkpress.core.engines.base import Capability, Completion, Engine, GenParams, GenStats, KVPolicy
from thinkpress.core.errors import (
    ConfigError,
    DataError,
    ModelError,
    PluginError,
    RunStoreError,
    ThinkpressError,
    TrainingError,
)
from thinkpress.core.files import atomic_dir, atomic_file, atomic_write_json, atomic_write_text
from thinkpress.core.grading import extract_answer, grade, is_equivalent
from thinkpress.core.models import model_identity
from thinkpress.core.plots import figure
from thinkpress.core.report import flips, fmt, fmt_num_ci, fmt_pct_ci
from thinkpress.core.results import RunResult, TestSetResult, VariantResult
from thinkpress.core.scoring import (
    ScorerOptions,
    TokenList,
    TokenScorer,
    check_surfaces,
    surfaces_from_offsets,
    validate_scorer,
)
from thinkpress.core.stages import (
    EVAL_ONLY,
    Component,
    ComponentConfig,
    EvalVariant,
    KVPruner,
    Refiner,
    Sampler,
    Selector,
    TracePruner,
    Trainer,
)
from thinkpress.core.stats import mcnemar_exact, paired_difference, paired_savings, wilson
from thinkpress.core.store import derive_seed, stable_hash

__all__ = [
    # hooks
    "hookimpl",
    # records
    "Problem", "Sample", "Example", "PreferencePair", "TrainingSet", "TrainResult", "Prediction",
    "read_jsonl", "write_jsonl",
    # stages
    "Component", "ComponentConfig", "EVAL_ONLY", "Sampler", "Selector", "Refiner", "TracePruner", "Trainer", "KVPruner",
    "EvalVariant", "StageContext",
    # results (what report_extras and the runner see)
    "RunResult", "TestSetResult", "VariantResult",
    # engines
    "Engine", "Capability", "GenParams", "Completion", "GenStats", "KVPolicy",
    # token scorers (TokenSkip-style importance)
    "TokenScorer", "ScorerOptions", "TokenList", "surfaces_from_offsets", "check_surfaces", "validate_scorer",
    # grading
    "grade", "extract_answer", "is_equivalent",
    # errors
    "ThinkpressError", "ConfigError", "PluginError", "ModelError", "DataError", "RunStoreError", "TrainingError",
    # reports, files, seeds
    "fmt", "fmt_pct_ci", "fmt_num_ci", "flips", "figure",
    "wilson", "mcnemar_exact", "paired_difference", "paired_savings",
    "atomic_file", "atomic_write_text", "atomic_write_json", "atomic_dir", "stable_hash", "derive_seed",
    "model_identity",
]
