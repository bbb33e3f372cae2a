"""What a stage component gets besides its input: the run, the engine, a work directory, progress."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from thinkpress.core.config import RunConfig
    from thinkpress.core.engines.base import Engine
    from thinkpress.core.plugins import Registry
    from thinkpress.core.store import RunStore

log = logging.getLogger("thinkpress")


class UI:
    """Console output: rich progress bars and messages, silenced by ``--quiet``."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True, soft_wrap=True)

    def info(self, msg: str) -> None:
        log.info(msg)
        if not self.quiet:
            self.console.print(msg, markup=False, highlight=False)  # messages hold [stage:name] and paths

    @contextmanager
    def progress(self, desc: str, total: int):
        """Yield ``advance(n)``; a rich bar unless quiet."""
        if self.quiet or total <= 0:
            yield lambda n=1: None
            return
        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn()]
        with Progress(*cols, console=self.console, transient=False) as prog:
            task = prog.add_task(desc, total=total)
            yield lambda n=1: prog.advance(task, n)


@dataclass
class RunState:
    """Shared across the stages of one run: the config, registry, store and the lazily loaded engine."""

    config: RunConfig
    registry: Registry
    store: RunStore
    ui: UI
    _engines: dict[tuple[str, str], Engine] = field(default_factory=dict)

    def engine(self, adapter: str | None = None, name: str | None = None) -> Engine:
        """Engine ``name`` (default: the run's ``engine``) for the base model or base + ``adapter``.

        Each engine loads the model once per run; adapters are views of that engine
        (``with_adapter``), kept for the rest of the run.
        """
        name = name or self.config.engine
        key = (name, adapter or "")
        if key not in self._engines:
            if not adapter:
                factory = self.registry.engine(name)
                self.ui.info(f"loading model {self.config.model} (engine {name})")
                self._engines[key] = factory(self.config)
            else:
                self._engines[key] = self.engine(name=name).with_adapter(adapter)
        return self._engines[key]

    def loaded_engines(self) -> list[str]:
        """The names of the engines loaded so far (adapter views are not counted)."""
        return [name for (name, adapter) in self._engines if not adapter]

    def close(self) -> None:
        """Release what the loaded engines hold (e.g. vLLM replica processes); adapter views share it."""
        for (_name, adapter), eng in self._engines.items():
            close = getattr(eng, "close", None)
            if close is not None and not adapter:
                close()
        self._engines.clear()
        gc.collect()  # vLLM's engine core holds reference cycles; free its KV cache and weights now


@dataclass
class StageContext:
    """Passed to every stage method."""

    run: RunState
    stage: str
    component: str
    workdir: Path
    """Directory for this stage's artifacts (inside the stage cache; kept with the stage output)."""
    key: str
    stats: dict[str, Any] = field(default_factory=dict)
    """Counters a component records (they land in the stage's meta.json and report.json)."""
    engine_name: str | None = None
    """The engine the plan assigned to this stage (None: the run's ``engine``)."""
    engine_used: bool = False
    """Whether the stage asked for :attr:`engine` (a stage that asked for neither engine is reported as using none)."""
    generator_used: bool = False
    """Whether the stage generated on :attr:`generator` (the report names that engine too)."""
    adapter: str | None = None
    """The policy's LoRA adapter in rounds after the first (``rounds`` > 1): the previous round's trained
    adapter. :attr:`engine` and :attr:`generator` serve base + this adapter; trainers continue it."""

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def seed(self) -> int:
        return self.run.config.seed

    @property
    def engine(self) -> Engine:
        """The engine assigned to this stage, with the capabilities its component declared it needs."""
        self.engine_used = True
        return self.run.engine(self.adapter, name=self.engine_name)

    @property
    def generator(self) -> Engine:
        """The run's ``engine``, for plain generation (sampling, decoding), whatever this stage was assigned.

        A stage whose component needs a capability the run's engine lacks runs on the fallback
        engine (``engine``); it can still draw its samples here, at the run engine's speed (the KL
        refiner draws candidates on vllm and scores them on hf). Same model, tokenizer and prompts.
        The stage's cache key names this engine too when it differs from ``engine``.
        """
        self.generator_used = True
        return self.run.engine(self.adapter)

    @property
    def ui(self) -> UI:
        return self.run.ui

    def log(self, msg: str) -> None:
        self.run.ui.info(f"[{self.stage}:{self.component}] {msg}")

    def journal_map(self, items: list, fn: Callable[[list], list], *, chunk_size: int, item_id: Callable[[Any], str],
                    desc: str, units_per_item: int = 1) -> list[dict]:
        """Resumable map over fixed chunks of ``items`` (see :func:`thinkpress.core.store.resumable_map`)."""
        from thinkpress.core.store import Journal, resumable_map

        journal = Journal(self.workdir / "journal.jsonl")
        with self.ui.progress(desc, len(items) * units_per_item) as advance:
            records, reused = resumable_map(journal, items, fn, chunk_size=chunk_size, item_id=item_id,
                                            on_chunk=lambda n: advance(n * units_per_item))
        if reused:
            self.stats["resumed_chunks"] = self.stats.get("resumed_chunks", 0) + reused
            self.log(f"resumed {reused} finished chunk(s) from the journal")
        return records
