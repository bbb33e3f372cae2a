"""The pipeline: resolve ``--plugins`` into components, run the five stages in order, evaluate, report.

Resolution rules (``resolve_plan``):

* every name in ``plugins`` must be an installed entry point or a built-in (else: error listing them);
* a single-valued stage (sampler, selector, trainer) takes ``stages.<stage>`` if set, else the
  default component of the one selected plugin that provides it, else ``fallback.<stage>`` (set by
  the presets); two selected plugins providing it is an error naming both and how to choose;
* refiners and trace pruners chain in ``--plugins`` order (or ``stages.refiners`` / ``stages.pruners``);
* KV pruners (decode-time policies) add evaluation variants;
* the training stages run when a selected plugin provides one of them (``train`` overrides): a run of
  KV pruners alone is an evaluation run.

All of this, the component configs (``components.<name>``) and the datasets are checked before the
run directory is touched. Each stage goes through the ``run_stage`` hook and is cached under a
content key (see :mod:`thinkpress.core.store`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from thinkpress.core.config import DataSpec, RunConfig, dump_yaml, format_validation_error
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import Prediction, Problem, Sample, TrainingSet, TrainResult, read_jsonl, write_jsonl
from thinkpress.core.errors import ConfigError, PluginError, ThinkpressError
from thinkpress.core.evaluation import grade, kv_agreement, paired_flips, summarize, with_intervals
from thinkpress.core.files import atomic_write_json
from thinkpress.core.models import EMBEDDED_MODELS, model_identity, resolve_model_path
from thinkpress.core.plugins import ComponentEntry, Registry, get_registry, is_kv
from thinkpress.core.stages import SINGLE_STAGES, Component, EvalVariant
from thinkpress.core.store import RunStore, stable_hash

log = logging.getLogger("thinkpress")

TRAINING_STAGES = ("sampler", "selector", "refiner", "pruner", "trainer")


@dataclass
class Planned:
    entry: ComponentEntry
    instance: Component

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Plan:
    """The components a run uses; the single stages are None only in a run that does not train."""

    sampler: Planned | None
    selector: Planned | None
    refiners: list[Planned]
    trace_pruners: list[Planned]
    trainer: Planned | None
    kv_pruners: list[Planned]
    train: bool
    component_configs: dict[str, Any] = field(default_factory=dict)

    def active(self) -> list[Planned]:
        """The components this plan runs (training stages only when it trains)."""
        train = [self.sampler, self.selector, *self.refiners, *self.trace_pruners, self.trainer] if self.train else []
        return train + self.kv_pruners

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"train": self.train}
        if self.train:
            d |= {"sampler": self.sampler.name, "selector": self.selector.name,
                  "refiners": [p.name for p in self.refiners], "pruners": [p.name for p in self.trace_pruners],
                  "trainer": self.trainer.name}
        d["kv_pruners"] = [p.name for p in self.kv_pruners]
        return d


def _instantiate(entry: ComponentEntry, cfg: RunConfig) -> Planned:
    raw = cfg.components.get(entry.name, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"components.{entry.name}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        conf = entry.cls.Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix=f"components.{entry.name}")) from None
    return Planned(entry, entry.cls(conf))


def resolve_plan(cfg: RunConfig, reg: Registry) -> Plan:
    reg.require_plugins(cfg.plugins)
    plugins = reg.expand_plugins(cfg.plugins)
    for name in cfg.components:
        if reg.find_component(name) is None:
            known = sorted(n for s in reg.components.values() for n in s)
            raise ConfigError(f"components.{name}: no component named {name!r}; known components: {', '.join(known)}")
        _instantiate(reg.find_component(name), cfg)  # validate even if not selected

    def single(stage: str) -> ComponentEntry | None:
        explicit = getattr(cfg.stages, stage)
        if explicit:
            try:
                return reg.component(stage, explicit)
            except PluginError as e:
                raise ConfigError(f"stages.{stage}: {e}") from None
        providers = [p for p in plugins if reg.by_plugin(stage, p)]
        if len(providers) > 1:
            opts = ", ".join(f"{reg.by_plugin(stage, p)[0].name!r} ({p})" for p in providers)
            raise PluginError(f"plugins {' and '.join(repr(p) for p in providers)} both provide a {stage}: {opts}. "
                              f"Choose one with --set stages.{stage}=<component name>, or drop a plugin.")
        if providers:
            return reg.by_plugin(stage, providers[0])[0]
        fallback = getattr(cfg.fallback, stage)
        if fallback is None:
            return None
        try:
            return reg.component(stage, fallback)
        except PluginError as e:
            raise ConfigError(f"fallback.{stage}: {e}") from None

    def chain(stage: str, explicit: list[str] | None, want_kv: bool | None) -> list[ComponentEntry]:
        if explicit is not None:
            out = []
            for n in explicit:
                try:
                    out.append(reg.component(stage, n))
                except PluginError as e:
                    raise ConfigError(f"stages.{'refiners' if stage == 'refiner' else 'pruners'}: {e}") from None
            return [e for e in out if want_kv is None or is_kv(e) == want_kv]
        out = []
        for p in plugins:
            found = [e for e in reg.by_plugin(stage, p) if want_kv is None or is_kv(e) == want_kv]
            if found:
                out.append(found[0])
        return out

    refiners = chain("refiner", cfg.stages.refiners, None)
    trace = chain("pruner", cfg.stages.pruners, False)
    kv = chain("pruner", cfg.stages.pruners, True)
    provides_training = any(
        any(not is_kv(e) for e in reg.by_plugin(stage, p)) for p in plugins for stage in TRAINING_STAGES
    ) or any(getattr(cfg.stages, s) for s in SINGLE_STAGES) or bool(cfg.stages.refiners)
    train = provides_training if cfg.train is None else cfg.train
    singles = {stage: single(stage) for stage in SINGLE_STAGES}
    missing = [s for s, e in singles.items() if e is None]
    if train and missing:
        raise ConfigError(f"no {missing[0]} to train with: no selected plugin provides one and "
                          f"fallback.{missing[0]} is not set (choose one with --set stages.{missing[0]}=<name>)")
    plan = Plan(
        sampler=_instantiate(singles["sampler"], cfg) if singles["sampler"] else None,
        selector=_instantiate(singles["selector"], cfg) if singles["selector"] else None,
        refiners=[_instantiate(e, cfg) for e in refiners],
        trace_pruners=[_instantiate(e, cfg) for e in trace],
        trainer=_instantiate(singles["trainer"], cfg) if singles["trainer"] else None,
        kv_pruners=[_instantiate(e, cfg) for e in kv],
        train=train,
    )
    for planned in plan.active():
        planned.instance.check(reg)
    return plan


def load_problems(spec: DataSpec, reg: Registry, seed: int, where: str) -> tuple[list[Problem], dict]:
    """The problems of one data spec (``where`` is its key path, for messages)."""
    loader = reg.dataset(spec.name)
    stats: dict = {}
    probs = loader(spec.split, path=spec.path, limit=None if spec.difficulty else spec.limit, seed=seed,
                   shuffle=spec.shuffle, skip_invalid=spec.skip_invalid, stats=stats)
    if spec.difficulty:
        probs = [p for p in probs if p.difficulty in spec.difficulty][: spec.limit]
    if not probs:
        raise ConfigError(f"{where}: dataset {spec.name!r} split {spec.split!r} has no problems")
    if stats.get("skipped"):
        log.warning("%s: skipped %d malformed rows", where, stats["skipped"])
    return probs, stats


@dataclass
class TestSet:
    """One evaluation set of a run: its spec, problems and content key."""

    name: str
    spec: DataSpec
    problems: list[Problem]
    key: str
    skipped_rows: int = 0

    __test__ = False  # not a pytest class

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.name, "label": self.name, "split": self.spec.split, "path": self.spec.path,
                "n": len(self.problems), "limit": self.spec.limit, "shuffle": self.spec.shuffle,
                "skipped_rows": self.skipped_rows}


def _git_state() -> dict[str, Any]:
    try:
        root = Path(__file__).resolve().parents[3]
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {}


def _manifest(cfg: RunConfig) -> dict[str, Any]:
    import torch
    import transformers

    from thinkpress import __version__

    return {
        "thinkpress": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "seed": cfg.seed, "config_hash": cfg.config_hash(), "git": _git_state(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _nondeterminism(cfg: RunConfig) -> list[str]:
    """Known sources of run-to-run differences for this config (empty: same config, same numbers).

    On CPU the hf engine is deterministic for a fixed thread count (greedy evaluation, per-problem
    sampling seeds, seeded training; tested by running the smoke config twice).
    """
    import torch

    notes = []
    if cfg.engine != "hf":
        notes.append(f"engine {cfg.engine!r}: run-to-run determinism not established")
    if torch.cuda.is_available() and not cfg.device.startswith("cpu"):
        notes.append("CUDA: cuBLAS/SDPA kernels and atomics can change low bits between runs, and so greedy "
                     "tokens near ties")
    return notes


def _adapter_identity(path: str) -> list[str]:
    """Content hash of a saved adapter's files (the cache key of its evaluations)."""
    import hashlib

    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    return [f"{p.relative_to(path)}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in files]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Runner:
    """Runs one resolved config."""

    def __init__(self, cfg: RunConfig, *, registry: Registry | None = None, ui: UI | None = None,
                 overwrite: bool = False):
        self.cfg = cfg
        self.reg = registry or get_registry()
        self.ui = ui or UI()
        self.overwrite = overwrite
        # Everything that can be wrong with the input is checked here, before any work.
        self.plan = resolve_plan(cfg, self.reg)
        self.test_sets: list[TestSet] = []
        for i, spec in enumerate(cfg.test_data if cfg.eval.enabled else []):
            probs, stats = load_problems(spec, self.reg, cfg.seed, f"test_data.{i}")
            self.test_sets.append(TestSet(spec.display_name(), spec, probs,
                                          stable_hash([x.model_dump(mode="json") for x in probs]),
                                          stats.get("skipped", 0)))
        self.train_problems, train_stats = (load_problems(cfg.train_data, self.reg, cfg.seed, "train_data")
                                            if self.plan.train else ([], {}))
        self.skipped_rows = {"train_data": train_stats.get("skipped", 0),
                             "test_data": sum(t.skipped_rows for t in self.test_sets)}
        if cfg.eval.adapter and not Path(cfg.eval.adapter, "adapter_config.json").exists():
            raise ConfigError(f"eval.adapter: {cfg.eval.adapter!r} is not a saved LoRA adapter directory "
                              "(no adapter_config.json)")
        self.reg.engine(cfg.engine)
        if cfg.model not in EMBEDDED_MODELS:
            resolve_model_path(cfg.model)  # a missing local model fails here, not after sampling
        self.model_id = model_identity(cfg.model)
        self.store = RunStore(cfg.run_dir(), cfg.stage_cache_dir())
        self.state = RunState(cfg, self.reg, self.store, self.ui)
        self.stage_info: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.eval_keys: dict[tuple[str, str], str] = {}
        """Evaluation cache key of every (test set, variant) evaluated so far (KV variants find their reference's)."""
        self.nondeterminism = _nondeterminism(cfg)
        self.report_lines: list[str] = []
        """Markdown that components add to report.md (see ``Component.report_extras``)."""

    # -- stages --------------------------------------------------------------------------------
    def _run(self, index: int, stage: str, planned: Planned, inputs: dict, input_keys: list[str]) -> tuple[Any, str]:
        comp = planned.instance
        key = stable_hash(stage, planned.name, comp.config.model_dump(mode="json"), input_keys, self.model_id,
                          self.cfg.seed, self.cfg.system_prompt, self.cfg.dtype)
        path = self.store.stage_cache(key)
        label = f"{index}-{stage}-{planned.name}"
        ctx = StageContext(run=self.state, stage=stage, component=planned.name, workdir=path, key=key)
        if self.store.is_complete(path):
            self.ui.info(f"[{stage}:{planned.name}] cached ({key[:12]})")
            meta = json.loads((path / "meta.json").read_text())
            result = self._load_output(stage, path)
            meta["cached"] = True
        else:
            path.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            result = self.reg.pm.hook.run_stage(stage=stage, component=comp, inputs=inputs, ctx=ctx)
            if result is None:
                raise PluginError(f"run_stage returned nothing for {stage} {planned.name!r}")
            wall = time.perf_counter() - t0
            self._save_output(stage, path, result)
            meta = {"stage": stage, "component": planned.name, "plugin": planned.entry.plugin, "key": key,
                    "inputs": input_keys, "config": comp.config.model_dump(mode="json"), "wall_s": wall,
                    "peak_rss_mb_process": _peak_rss_mb(), "stats": ctx.stats, "cached": False}
            atomic_write_json(path / "meta.json", meta)  # the completion marker: written last
        self.store.publish_stage(path, label)
        self.stage_info[label] = {k: meta.get(k) for k in ("component", "plugin", "key", "wall_s", "cached", "stats")}
        return result, key

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
        from thinkpress.core.data import Example, PreferencePair

        return TrainingSet(examples=read_jsonl(path / "examples.jsonl", Example),
                           pairs=read_jsonl(path / "pairs.jsonl", PreferencePair))

    def _adapter_abs(self, result: TrainResult, key: str) -> str | None:
        if not result.adapter_path:
            return None
        p = Path(result.adapter_path)
        return str(p if p.is_absolute() else self.store.stage_cache(key) / p)

    def train(self) -> tuple[TrainResult | None, str | None, Planned | None]:
        if not self.plan.train:
            return None, None, None
        p = self.plan
        data_key = stable_hash([x.model_dump(mode="json") for x in self.train_problems])
        samples, k = self._run(1, "sampler", p.sampler, {"problems": self.train_problems}, [data_key])
        data, k = self._run(2, "selector", p.selector, {"samples": samples, "problems": self.train_problems}, [k])
        i = 3
        for r in p.refiners:
            data, k = self._run(i, "refiner", r, {"data": data}, [k])
            i += 1
        for r in p.trace_pruners:
            data, k = self._run(i, "pruner", r, {"data": data}, [k])
            i += 1
        if not data.examples and not data.pairs:
            counts = {k: v for k, v in self.stage_info.get(f"2-selector-{p.selector.name}", {}).get("stats", {}).items()
                      if isinstance(v, int | float)}
            raise ThinkpressError(
                f"the training set is empty after selection by {p.selector.name!r} ({counts}): no correct samples, "
                "none kept, or (preference selectors) every problem all-correct or all-wrong. The finished stages "
                "are cached. Use more or harder problems (train_data.limit), more samples or a stronger model."
            )
        result, k = self._run(i, "trainer", p.trainer, {"data": data}, [k])
        return result, k, p.trainer

    # -- evaluation ----------------------------------------------------------------------------
    def variants(self, result: TrainResult | None, train_key: str | None, trainer: Planned | None) -> list[EvalVariant]:
        base: list[EvalVariant] = [EvalVariant(name="base", params={})] if self.cfg.eval.base else []
        trained: list[EvalVariant] = []
        if self.cfg.eval.adapter:
            path = str(Path(self.cfg.eval.adapter).resolve())
            key = stable_hash(_adapter_identity(path))[:12]
            trained.append(EvalVariant(name="adapter", params={"adapter_key": key}, adapter=path))
        if result is not None and result.adapter_path:
            adapter = self._adapter_abs(result, train_key)
            ctx = StageContext(self.state, "trainer", trainer.name, self.store.stage_cache(train_key), train_key)
            custom = trainer.instance.eval_variants(ctx)
            trained = custom if custom is not None else [EvalVariant(name="trained", params={})]
            for v in trained:
                v.adapter = v.adapter or adapter
                v.params.setdefault("adapter_key", train_key[:12])
        out = base + trained
        for kv in self.plan.kv_pruners:
            for params in kv.instance.variants():
                for v in base + trained:
                    tag = ",".join(f"{k}={val}" for k, val in params.items())
                    out.append(EvalVariant(name=f"{v.name}+{kv.name}" + (f"@{tag}" if tag else ""),
                                           params={**v.params, "kv_policy": kv.name, **params}, adapter=v.adapter,
                                           prompt_suffix=v.prompt_suffix, kv_pruner=kv.name, kv_params=params,
                                           max_new_tokens=v.max_new_tokens, reference=v.name))
        return out

    def evaluate_variant(self, v: EvalVariant, ts: TestSet) -> dict[str, Any]:
        """Evaluate one variant on one test set (resumable per chunk, cached by content key)."""
        from thinkpress.core.engines.base import GenParams

        g = self.cfg.eval.generation
        params = GenParams(max_new_tokens=v.max_new_tokens or g.max_new_tokens, temperature=g.temperature,
                           top_p=g.top_p, stop=g.stop)
        # params hold the trainer stage's key (adapter_key) for trained variants: it identifies the adapter.
        # "eval-v3": unmerged adapters and strict grading (older cached evaluations are not reused).
        key = stable_hash("eval-v3", v.name, v.params, v.prompt_suffix, v.kv_pruner, v.kv_params, ts.key,
                          g.model_dump(mode="json"), self.model_id, self.cfg.system_prompt, self.cfg.dtype,
                          self.cfg.seed)
        path = self.store.stage_cache(key)
        ctx = StageContext(self.state, "eval", v.name, path, key)
        engine = self.state.engine(v.adapter)
        policy = None
        if v.kv_pruner:
            kv = next(p for p in self.plan.kv_pruners if p.name == v.kv_pruner)
            policy = kv.instance.make_policy(v.kv_params)

        def run_chunk(chunk: list[Problem]) -> list[Prediction]:
            engine.stats.reset()
            t0 = time.perf_counter()
            prompts = [engine.chat_prompt(p.question, suffix=v.prompt_suffix) for p in chunk]
            outs = engine.generate(prompts, params, n=1, batch_size=g.batch_size, kv_policy=policy)
            wall = time.perf_counter() - t0
            recs = []
            for p, o in zip(chunk, outs, strict=True):
                pred, ok = grade(o[0].text, p.answer, truncated=o[0].finish_reason == "length")
                recs.append(Prediction(problem_id=p.id, completion=o[0].text, n_tokens=o[0].n_tokens,
                                       finish_reason=o[0].finish_reason, pred=pred, correct=ok,
                                       decode_s=engine.stats.decode_s / len(chunk), wall_s=wall / len(chunk),
                                       peak_kv_bytes=engine.stats.peak_kv_bytes, token_ids=o[0].token_ids,
                                       kv_evicted=engine.stats.kv_evicted / len(chunk)))
            return recs

        recs = ctx.journal_map(ts.problems, run_chunk, chunk_size=g.batch_size, item_id=lambda p: p.id,
                               desc=f"eval {v.name} on {ts.name}")
        out_dir = self._eval_dir(ts, v.name)
        write_jsonl(out_dir / "predictions.jsonl", recs)
        metrics = summarize(recs, wall_s=sum(r["wall_s"] for r in recs), decode_s=sum(r["decode_s"] for r in recs),
                            peak_kv_bytes=max((r["peak_kv_bytes"] for r in recs), default=None))
        row = {"name": v.name, "params": v.params, "test_set": ts.name, "reference": v.reference or "base", **metrics}
        self.eval_keys[(ts.name, v.name)] = key
        ref = v.reference or "base"
        ref_recs = self.predictions(ts, ref) if ref != v.name else None
        base_recs = self.predictions(ts, "base") if v.name != "base" else None
        row |= with_intervals(recs, base=base_recs, reference=ref_recs, n_boot=self.cfg.eval.bootstrap,
                              seed=self.cfg.seed)
        if ref_recs is not None:
            row |= {"flips_vs": ref, **paired_flips(ref_recs, recs)}
        if v.kv_pruner and self.cfg.eval.kv_agreement:
            if ref_recs is None:
                log.warning("no full-cache variant %r evaluated in this run: no agreement metrics for %s", ref, v.name)
            else:
                row |= self.agreement(v, ts, ref, ref_recs, recs, policy, engine, key)
        atomic_write_json(out_dir / "metrics.json", row)
        return row

    def _eval_dir(self, ts: TestSet, name: str) -> Path:
        return self.store.dir / "eval" / ts.name.replace("/", "_") / name.replace("/", "_")

    def predictions(self, ts: TestSet, name: str) -> list[dict[str, Any]] | None:
        """The predictions of a variant evaluated earlier in this run on ``ts`` (None if it was not)."""
        path = self._eval_dir(ts, name) / "predictions.jsonl"
        if (ts.name, name) not in self.eval_keys or not path.exists():
            return None
        return [p.model_dump() for p in read_jsonl(path, Prediction)]

    def agreement(self, v: EvalVariant, ts: TestSet, ref: str, full: list[dict[str, Any]], recs: list[dict[str, Any]],
                  policy, engine, key: str) -> dict[str, Any]:
        """Token agreement with, and teacher-forced NLL of, the full-cache variant ``ref``'s EOS-ended outputs."""
        from thinkpress.core.engines.base import KVPolicy

        out = kv_agreement(full, recs)
        todo = [f for f in full if f["finish_reason"] == "eos" and f.get("token_ids")]
        if not todo:
            return out
        g = self.cfg.eval.generation
        problems = {p.id: p for p in ts.problems}

        def nll(pol, stage_key: str, desc: str) -> float:
            ctx = StageContext(self.state, "eval", desc, self.store.stage_cache(stage_key), stage_key)

            def run_chunk(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
                qs = [problems[f["problem_id"]].question for f in chunk]
                prompts = [engine.chat_prompt(q, suffix=v.prompt_suffix) for q in qs]
                lps = engine.forced_decode(prompts, [f["token_ids"] for f in chunk], kv_policy=pol,
                                           batch_size=g.batch_size)
                return [{"problem_id": f["problem_id"], "nll_sum": -sum(lp), "n": len(lp)} for f, lp in
                        zip(chunk, lps, strict=True)]

            rows = ctx.journal_map(todo, run_chunk, chunk_size=g.batch_size, item_id=lambda f: f["problem_id"],
                                   desc=desc)
            return sum(r["nll_sum"] for r in rows) / max(1, sum(r["n"] for r in rows))

        out["nll_full"] = nll(KVPolicy(), stable_hash("nll-full", self.eval_keys[(ts.name, ref)]), f"nll {ref}")
        out["nll_pruned"] = nll(policy, stable_hash("nll", key), f"nll {v.name}")
        return out

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import torch

        from thinkpress.core.report import write_report

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        resumed = self.store.claim(dump_yaml(cfg), cfg.config_hash(), overwrite=self.overwrite)
        handler = logging.FileHandler(self.store.dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            manifest = _manifest(cfg) | {"resumed": resumed, "plan": self.plan.describe(),
                                         "skipped_rows": self.skipped_rows,
                                         "nondeterminism": self.nondeterminism}
            if any(self.skipped_rows.values()):
                self.ui.info(f"skipped malformed dataset rows: {self.skipped_rows}")
            atomic_write_json(self.store.dir / "manifest.json", manifest)
            self.ui.info(f"run directory {self.store.dir} ({'resuming' if resumed else 'new'}); "
                         f"plan: {self.plan.describe()}")
            t0 = time.perf_counter()
            result, train_key, trainer = self.train()
            self.timings["train_s"] = time.perf_counter() - t0
            results: dict[str, list[dict[str, Any]]] = {}
            if cfg.eval.enabled:
                t1 = time.perf_counter()
                variants = self.variants(result, train_key, trainer)
                for ts in self.test_sets:
                    results[ts.name] = [self.evaluate_variant(v, ts) for v in variants]
                self.timings["eval_s"] = time.perf_counter() - t1
            self.timings["total_s"] = time.perf_counter() - t0
            rows = results[self.test_sets[0].name] if results else []
            if rows:
                # components' own report sections (ratio sweeps, KV budget curves) cover the primary test set
                extras = ([trainer] if trainer else []) + self.plan.kv_pruners
                for planned in extras:
                    self.report_lines += planned.instance.report_extras(rows, self.store.dir)
            manifest |= {"timings": self.timings, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "peak_rss_mb_process": _peak_rss_mb()}
            atomic_write_json(self.store.dir / "manifest.json", manifest)
            return write_report(self, results)
        finally:
            log.removeHandler(handler)
            handler.close()
