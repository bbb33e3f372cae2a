"""Data model shared by all stages, and JSONL reading/writing.

Every record is a pydantic model so that a stage's output on disk is validated when it is read back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thinkpress.core.errors import DataError
from thinkpress.core.files import atomic_file

FinishReason = Literal["eos", "stop", "length"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(Record):
    """One benchmark problem with its gold answer."""

    id: str = Field(description="Stable identifier, unique within the dataset")
    question: str = Field(description="The problem statement shown to the model")
    answer: str = Field(description="Gold final answer (a number or a LaTeX expression)")
    solution: str | None = Field(default=None, description="Reference solution text, when the dataset has one")
    source: str = Field(default="", description="Dataset name")
    difficulty: int | None = Field(default=None, description="Difficulty level (e.g. number of steps), if known")
    meta: dict[str, Any] = Field(default_factory=dict)


class Sample(Record):
    """One graded completion of a problem."""

    problem_id: str
    index: int = Field(description="Sample index within the problem (0..N-1)")
    prompt: str = Field(description="The exact text fed to the model (chat template applied)")
    completion: str
    n_tokens: int
    finish_reason: FinishReason
    pred: str | None = Field(default=None, description="Extracted final answer")
    correct: bool = False
    logprob: float | None = Field(default=None, description="Sum of token log-probabilities of the completion")


class Example(Record):
    """An SFT target: train the model to produce ``completion`` after ``prompt``."""

    id: str
    problem_id: str
    prompt: str
    completion: str
    meta: dict[str, Any] = Field(default_factory=dict)


class PreferencePair(Record):
    """A preference pair for DPO-style objectives."""

    id: str
    problem_id: str
    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = Field(default_factory=dict)


class TrainingSet(Record):
    """What selectors, refiners and trace pruners exchange: SFT examples and/or preference pairs."""

    examples: list[Example] = Field(default_factory=list)
    pairs: list[PreferencePair] = Field(default_factory=list)


class Prediction(Record):
    """One evaluation answer, with its share of the chunk's timing (so metrics survive resume)."""

    problem_id: str
    completion: str
    n_tokens: int
    finish_reason: FinishReason
    pred: str | None
    correct: bool
    decode_s: float = Field(description="This answer's share of the batch's decode time")
    wall_s: float = Field(description="This answer's share of the batch's wall time")
    peak_kv_bytes: int = Field(description="Peak KV-cache bytes of the batch it was decoded in")
    token_ids: list[int] | None = Field(default=None, description="The generated token ids (for agreement metrics)")
    kv_evicted: float = Field(default=0.0, description="This answer's share of the cache entries its batch's KV "
                              "policy evicted")
    kv_kept_peak: float | None = Field(default=None, description="Most cache entries it held at once while decoding "
                                       "over its full cache's (prompt + output); None where the engine does not count")
    kv_kept_mean: float | None = Field(default=None, description="Entries held over full-cache entries, summed over "
                                       "its decode steps")
    threads: int | None = Field(default=None, description="torch threads its batch was decoded with (timings are "
                                "compared only at equal counts; None: not recorded)")


class TrainResult(Record):
    """What a trainer returns: where the adapter (or model) is, and training metrics."""

    adapter_path: str | None = Field(description="Directory of the saved LoRA adapter (None: nothing was trained)")
    metrics: dict[str, Any] = Field(default_factory=dict)


R = TypeVar("R", bound=BaseModel)


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> None:
    """Write records atomically (see :mod:`thinkpress.core.files`)."""
    with atomic_file(path) as f:
        for r in records:
            d = r.model_dump(mode="json") if isinstance(r, BaseModel) else r
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | Path, *, skip_invalid: bool = False, stats: dict | None = None) -> Iterator[dict]:
    """Yield JSON objects from a JSONL file; a malformed row is an error naming file and line.

    With ``skip_invalid`` malformed rows are skipped and counted in ``stats["skipped"]``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as e:
                if skip_invalid:
                    if stats is not None:
                        stats["skipped"] = stats.get("skipped", 0) + 1
                    continue
                raise DataError(f"{path}:{lineno}: malformed JSONL row ({e})") from None
            yield obj


def read_jsonl(path: str | Path, model: type[R]) -> list[R]:
    """Read and validate records of ``model`` from a JSONL file written by the run store."""
    out = []
    for i, obj in enumerate(iter_jsonl(path), 1):
        try:
            out.append(model.model_validate(obj))
        except ValidationError as e:
            raise DataError(f"{path}:{i}: invalid {model.__name__}: {e}") from None
    return out
