"""Stage execution: each training stage through the ``run_stage`` hook, cached under a content key.

A stage's key hashes the stage, the component and its config, the keys of its inputs, the model
identity, the seed, the system prompt, the dtype and the engine that runs it (with its options); a
trainer launched as several processes adds the launch (:meth:`LaunchConfig.identity`). A
finished stage (``meta.json`` written last) is loaded instead of recomputed; long stages resume from
their journal (see :mod:`.store`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from thinkpress.core.config import RunConfig
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import (
    Example,
    PreferencePair,
    Problem,
    Sample,
    TrainingSet,
    TrainResult,
    read_jsonl,
    write_jsonl,
)
from thinkpress.core.errors import PluginError, ThinkpressError
from thinkpress.core.files import atomic_write_json
from thinkpress.core.manifest import peak_rss_mb
from thinkpress.core.planning import Plan, Planned, stage_engine_identity
from thinkpress.core.plugins import Registry
from thinkpress.core.store import RunStore, stable_hash


class StageExecutor:
    """Runs the training stages of a plan: sampler, selector, refiners, trace pruners, trainer."""

    def __init__(self, cfg: RunConfig, reg: Registry, store: RunStore, state: RunState, ui: UI, model_id: str,
                 plan: Plan):
        self.cfg, self.reg, self.store, self.state, self.ui, self.model_id = cfg, reg, store, state, ui, model_id
        self.plan = plan
        self.stage_info: dict[str, Any] = {}
        """Per stage label: component, plugin, key, wall time, cached, stats (for the report)."""
        self.rounds: list[dict[str, Any]] = []
        """Per training round: its number, the trainer's stage key, the adapter directory, the label prefix."""

    def run_stage(self, index: int, stage: str, planned: Planned, inputs: dict,
                  input_keys: list[str], *, adapter: str | None = None, label_prefix: str = "") -> tuple[Any, str]:
        """Run (or load from the cache) one stage; returns its output and its cache key.

        ``adapter``: the policy's adapter (later self-improvement rounds); its trainer key must be in
        ``input_keys``, so the cache key names it.
        """
        engine = self.plan.engine_for(stage, planned.name) or self.cfg.engine
        key = self.stage_key(stage, planned, input_keys)
        path = self.store.stage_cache(key)
        label = f"{label_prefix}{index}-{stage}-{planned.name}"
        ctx = StageContext(run=self.state, stage=stage, component=planned.name, workdir=path, key=key,
                           engine_name=engine, adapter=adapter)
        with self.store.lock(key):  # another worker computing this stage: wait, then reuse its output
            return self._run_locked(stage, planned, inputs, input_keys, ctx, engine, label)

    def _run_locked(self, stage: str, planned: Planned, inputs: dict, input_keys: list[str], ctx: StageContext,
                    engine: str, label: str) -> tuple[Any, str]:
        comp, key, path = planned.instance, ctx.key, ctx.workdir
        if self.store.is_complete(path):
            self.ui.info(f"[{stage}:{planned.name}] cached ({key[:12]})")
            meta = json.loads((path / "meta.json").read_text())
            result = self._load_output(stage, path)
            meta["cached"] = True
        else:
            path.mkdir(parents=True, exist_ok=True)
            if stage == "trainer":
                self._release_engines(planned.name)
            t0 = time.perf_counter()
            if stage == "trainer" and self.cfg.launch.launcher != "none":
                from thinkpress.core.launch import launch_trainer

                result = launch_trainer(self.cfg, self.reg, planned, inputs["data"], ctx)
            else:
                result = self.reg.pm.hook.run_stage(stage=stage, component=comp, inputs=inputs, ctx=ctx)
            if result is None:
                raise PluginError(f"run_stage returned nothing for {stage} {planned.name!r}")
            wall = time.perf_counter() - t0
            self._save_output(stage, path, result)
            meta = {"stage": stage, "component": planned.name, "plugin": planned.entry.plugin, "key": key,
                    "engine": self._engine_label(engine, ctx),
                    "inputs": input_keys, "config": comp.config.model_dump(mode="json"), "wall_s": wall,
                    "peak_rss_mb_process": peak_rss_mb(), "stats": ctx.stats, "cached": False}
            atomic_write_json(path / "meta.json", meta)  # the completion marker: written last
        self.store.publish_stage(path, label)
        self.stage_info[label] = {k: meta.get(k) for k in ("component", "plugin", "engine", "key", "wall_s", "cached",
                                                           "stats")}
        return result, key

    def _engine_label(self, engine: str, ctx: StageContext) -> str:
        """The engine(s) a finished stage used: the assigned one, the run's for samples drawn on
        ``ctx.generator``, or ``none`` (a trainer that loads its own model copy)."""
        if ctx.generator_used and engine != self.cfg.engine:
            return f"{engine} (samples: {self.cfg.engine})" if ctx.engine_used else self.cfg.engine
        return engine if ctx.engine_used or ctx.generator_used else "none"

    def _release_engines(self, trainer: str) -> None:
        """Drop the engines the earlier stages loaded before a trainer runs.

        A trainer loads and trains its own copy of the model; an engine kept from sampling or scoring
        (vLLM's KV cache and weights, the hf scorer) only adds to the training peak: a TokenSkip run on
        320 GSM8K problems peaked at 23.0 GiB with vLLM and the scorer kept, one whose sampling stage came
        from the stage cache (vLLM never loaded) at 16.6 GiB. Engines load again, lazily, when evaluation
        or the next round needs one (vLLM with the 0.5B model: about 8 s).
        """
        loaded = self.state.loaded_engines()
        if loaded:
            self.ui.info(f"[trainer:{trainer}] releasing the loaded engines ({', '.join(loaded)}) before training; "
                         "they reload when needed")
            self.state.close()

    def stage_key(self, stage: str, planned: Planned, input_keys: list[str]) -> str:
        """A stage's cache key: stage, component, its config (less eval-only fields), input keys, model, seed,
        prompt, dtype, engine."""
        engine = self.plan.engine_for(stage, planned.name) or self.cfg.engine
        launch = self.cfg.launch.identity() if stage == "trainer" else []  # empty for in-process training
        return stable_hash(stage, planned.name, planned.instance.config.key_dump(), input_keys,
                           self.model_id, self.cfg.seed, self.cfg.system_prompt, self.cfg.dtype,
                           *stage_engine_identity(self.cfg, engine), *launch)

    def planned_keys(self, p: Plan, train_problems: list[Problem]) -> dict[str, str]:
        """Every training stage's cache key (by report label), computed without running anything: what
        ``core ablate --dry-run`` compares across variants."""
        if not p.train:
            return {}
        out: dict[str, str] = {}
        keys = [stable_hash([x.model_dump(mode="json") for x in train_problems])]
        for rnd in range(1, self.cfg.rounds + 1):
            prefix = f"r{rnd}-" if self.cfg.rounds > 1 else ""
            chain = [("sampler", p.sampler), ("selector", p.selector), *[("refiner", r) for r in p.refiners],
                     *[("pruner", r) for r in p.trace_pruners], ("trainer", p.trainer)]
            k_in = keys
            for i, (stage, planned) in enumerate(chain, 1):
                k = self.stage_key(stage, planned, k_in)
                out[f"{prefix}{i}-{stage}-{planned.name}"] = k
                k_in = [k]
            keys = [keys[0], k_in[0]]
        return out

    @staticmethod
    def _save_output(stage: str, path: Path, result: Any) -> None:
        if stage == "sampler":
            write_jsonl(path / "samples.jsonl", result)
        elif stage == "trainer":
            res = result.model_copy()
            if res.adapter_path and Path(res.adapter_path).is_relative_to(path):
                res.adapter_path = str(Path(res.adapter_path).relative_to(path))
            atomic_write_json(path / "result.json", res.model_dump(mode="json"))
        else:
            if not isinstance(result, TrainingSet):
                raise PluginError(f"{stage} must return a TrainingSet, got {type(result).__name__}")
            write_jsonl(path / "examples.jsonl", result.examples)
            write_jsonl(path / "pairs.jsonl", result.pairs)

    @staticmethod
    def _load_output(stage: str, path: Path) -> Any:
        if stage == "sampler":
            return read_jsonl(path / "samples.jsonl", Sample)
        if stage == "trainer":
            return TrainResult.model_validate(json.loads((path / "result.json").read_text()))
        return TrainingSet(examples=read_jsonl(path / "examples.jsonl", Example),
                           pairs=read_jsonl(path / "pairs.jsonl", PreferencePair))

    def adapter_path(self, result: TrainResult, key: str) -> str | None:
        """The absolute directory of a trainer's adapter (stored relative to its stage cache)."""
        if not result.adapter_path:
            return None
        p = Path(result.adapter_path)
        return str(p if p.is_absolute() else self.store.stage_cache(key) / p)

    def train(self, p: Plan, train_problems: list[Problem]) -> tuple[TrainResult | None, str | None, Planned | None]:
        """Run the training stages (``rounds`` times); returns the last trainer's result, its stage key and the
        trainer. Each round's adapter and key are in :attr:`rounds`."""
        if not p.train:
            return None, None, None
        data_key = stable_hash([x.model_dump(mode="json") for x in train_problems])
        result: TrainResult | None = None
        prev: list[str] = []  # the previous round's trainer key (none in round 1: its keys are the one-round keys)
        adapter: str | None = None
        for rnd in range(1, self.cfg.rounds + 1):
            prefix = f"r{rnd}-" if self.cfg.rounds > 1 else ""
            result, k = self._one_round(p, train_problems, [data_key, *prev], adapter, prefix)
            adapter = self.adapter_path(result, k)
            if adapter is None and rnd < self.cfg.rounds:
                raise ThinkpressError(f"rounds={self.cfg.rounds}: the trainer {p.trainer.name!r} saved no adapter in "
                                      f"round {rnd}, so there is no policy to sample from in round {rnd + 1}")
            self.rounds.append({"round": rnd, "key": k, "adapter": adapter, "prefix": prefix})
            prev = [k]
        return result, self.rounds[-1]["key"], p.trainer

    def _one_round(self, p: Plan, train_problems: list[Problem], keys: list[str], adapter: str | None,
                   prefix: str) -> tuple[TrainResult, str]:
        kw = {"adapter": adapter, "label_prefix": prefix}
        samples, k = self.run_stage(1, "sampler", p.sampler, {"problems": train_problems}, keys, **kw)
        data, k = self.run_stage(2, "selector", p.selector, {"samples": samples, "problems": train_problems}, [k], **kw)
        i = 3
        for r in p.refiners:
            data, k = self.run_stage(i, "refiner", r, {"data": data}, [k], **kw)
            i += 1
        for r in p.trace_pruners:
            data, k = self.run_stage(i, "pruner", r, {"data": data}, [k], **kw)
            i += 1
        if not data.examples and not data.pairs:
            sel = self.stage_info.get(f"{prefix}2-selector-{p.selector.name}", {}).get("stats", {})
            counts = {k: v for k, v in sel.items() if isinstance(v, int | float)}
            raise ThinkpressError(
                f"the training set is empty after selection by {p.selector.name!r} ({counts}): no correct samples, "
                "none kept, or (preference selectors) every problem all-correct or all-wrong. The finished stages "
                "are cached. Use more or harder problems (train_data.limit), more samples or a stronger model."
            )
        return self.run_stage(i, "trainer", p.trainer, {"data": data}, [k], **kw)
