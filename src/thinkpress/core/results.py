"""What a run produced, typed: per test set the evaluated variants and their rows, plus the run's facts.

``RunResult`` is what the report is written from (``core/report.py``) and what the runner returns
alongside report.json. A row is the variant's metrics (report.json's contract keys and the extras
components add); the variant that produced it, with its reference, is kept next to it, so nothing
parses names to find what a row is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkpress.core.config import RunConfig
from thinkpress.core.data import TrainResult
from thinkpress.core.planning import Plan, TestSet
from thinkpress.core.stages import EvalVariant


@dataclass
class VariantResult:
    """One variant evaluated on one test set."""

    variant: EvalVariant
    row: dict[str, Any]
    """The metrics: accuracy, tokens, intervals, lost/gained vs. the reference, KV agreement, extras."""

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def reference(self) -> str:
        return self.variant.reference or "base"


@dataclass
class TestSetResult:
    """Every variant on one test set."""

    test_set: TestSet
    variants: list[VariantResult] = field(default_factory=list)

    __test__ = False  # not a pytest class

    @property
    def name(self) -> str:
        return self.test_set.name

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [v.row for v in self.variants]

    def get(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass
class RunResult:
    """A finished run: its config and plan, what each stage did, and the evaluation per test set."""

    config: RunConfig
    plan: Plan
    out_dir: Path
    test_sets: list[TestSetResult]
    train: TrainResult | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    nondeterminism: list[str] = field(default_factory=list)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    report_lines: list[str] = field(default_factory=list)
    """Markdown that components add to report.md (see ``Component.report_extras``)."""

    @property
    def primary(self) -> TestSetResult | None:
        """The first test set: report.json's ``dataset`` and ``variants``, and the components' own sections."""
        return self.test_sets[0] if self.test_sets else None

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Test set name -> its rows."""
        return {ts.name: ts.rows for ts in self.test_sets}
