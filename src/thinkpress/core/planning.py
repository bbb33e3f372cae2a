"""Planning: ``--plugins`` and the config resolved into a typed :class:`Plan` and test sets, before any work.

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

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from thinkpress.core.config import DataSpec, RunConfig, format_validation_error
from thinkpress.core.data import Problem
from thinkpress.core.errors import ConfigError, PluginError
from thinkpress.core.plugins import ComponentEntry, Registry, is_kv
from thinkpress.core.stages import SINGLE_STAGES, Component

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
    engines: dict[str, str] = field(default_factory=dict)
    """Which engine runs what: ``"<stage> <component>"`` and ``"evaluation"`` -> engine name
    (see :func:`assign_engines`)."""

    def engine_for(self, stage: str, component: str) -> str | None:
        """The engine assigned to a stage's component (None: the run's engine)."""
        return self.engines.get(f"{stage} {component}")

    @property
    def eval_engine(self) -> str | None:
        return self.engines.get("evaluation")

    def active(self) -> list[Planned]:
        """The components this plan runs (training stages only when it trains)."""
        train = [self.sampler, self.selector, *self.refiners, *self.trace_pruners, self.trainer] if self.train else []
        return train + self.kv_pruners

    def steps(self) -> list[tuple[str, Planned]]:
        """(stage, component) in the order the run uses them (KV pruners last: they act in evaluation)."""
        out: list[tuple[str, Planned]] = []
        if self.train:
            out += [("sampler", self.sampler), ("selector", self.selector)]
            out += [("refiner", r) for r in self.refiners] + [("pruner", r) for r in self.trace_pruners]
            out.append(("trainer", self.trainer))
        return out + [("kv pruner", p) for p in self.kv_pruners]

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"train": self.train}
        if self.train:
            d |= {"sampler": self.sampler.name, "selector": self.selector.name,
                  "refiners": [p.name for p in self.refiners], "pruners": [p.name for p in self.trace_pruners],
                  "trainer": self.trainer.name}
        d["kv_pruners"] = [p.name for p in self.kv_pruners]
        if self.engines:
            d["engines"] = dict(self.engines)
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
    for planned in plan.active():
        planned.instance.check_plan(plan)
    plan.engines = assign_engines(plan, cfg, reg)
    return plan


def evaluation_requirements(plan: Plan, cfg: RunConfig) -> dict[str, str]:
    """Capabilities the evaluation needs -> why (config key or stage)."""
    if not cfg.eval.enabled:
        return {}
    need = {}
    if plan.train or cfg.eval.adapter:
        need["adapters"] = "eval.adapter" if cfg.eval.adapter else "evaluating the trained adapter"
    if plan.kv_pruners and cfg.eval.kv_agreement:
        need["forced_decode"] = "eval.kv_agreement (the NLL of the full-cache answers under each KV policy)"
    return need


def engine_identity(cfg: RunConfig, engine: str) -> list[Any]:
    """What of the engine goes into a cache key: its name and its ``engine_options`` (outputs depend on both).

    The hf engine without options adds nothing, so the stage and evaluation caches of runs made before
    engines were selectable (all on hf) stay valid.
    """
    options = cfg.engine_options.get(engine, {})
    return [] if engine == "hf" and not options else [engine, options]


def stage_engine_identity(cfg: RunConfig, engine: str) -> list[Any]:
    """The engines in a training stage's cache key: its own and, where that is not the run's engine, the
    run's too (the stage may draw samples there: :attr:`thinkpress.core.context.StageContext.generator`)."""
    out = engine_identity(cfg, engine)
    return out if engine == cfg.engine else [*out, "generator", *engine_identity(cfg, cfg.engine)]


def assign_engines(plan: Plan, cfg: RunConfig, reg: Registry) -> dict[str, str]:
    """Give each training stage and the evaluation the engine that has the capabilities it needs.

    ``cfg.engine`` runs everything it can; what needs a capability it lacks runs on
    ``cfg.fallback_engine`` (e.g. vllm samples and evaluates, hf scores for the KL refiner and
    decodes under KV policies). The evaluation runs on one engine for all its variants, so KV
    variants and their full-cache references are decoded by the same engine. A need that neither
    engine meets is refused here, before any work, naming the component, the capability and both
    engines. Every engine the plan uses has its factory's ``check(cfg)`` called.
    """
    main, fallback = cfg.engine, cfg.fallback_engine
    reg.engine(main)
    if fallback is not None:
        try:
            reg.engine(fallback)
        except PluginError as e:
            raise ConfigError(f"fallback_engine: {e}") from None
    have = {main: reg.engine_capabilities(main)}
    if fallback is not None:
        have[fallback] = reg.engine_capabilities(fallback)

    def pick(needs: dict[str, str | None], who: str) -> str:
        if all(cap in have[main] for cap in needs):
            return main
        lack = next(cap for cap in needs if cap not in have[main])
        if fallback is not None and all(cap in have[fallback] for cap in needs):
            return fallback
        engines = f"engine {main!r} provides {', '.join(sorted(have[main])) or 'generation only'}"
        if fallback is not None and fallback != main:
            engines += f", fallback_engine {fallback!r} provides {', '.join(sorted(have[fallback])) or 'nothing more'}"
        why = f" ({needs[lack]})" if needs[lack] else ""
        raise ConfigError(f"{who} needs {lack!r}{why}, which no engine of this run provides ({engines}); "
                          "choose another engine or drop the component")

    out: dict[str, str] = {}
    for stage, p in plan.steps():
        if stage == "kv pruner":
            continue
        needs: dict[str, str | None] = {cap: None for cap in sorted(p.instance.requirements())}
        out[f"{stage} {p.name}"] = pick(needs, f"{stage} {p.name!r} ({p.entry.plugin})")
    if cfg.eval.enabled:
        needs: dict[str, str | None] = dict(evaluation_requirements(plan, cfg))
        for p in plan.kv_pruners:
            for cap in sorted(p.instance.requirements()):
                needs.setdefault(cap, f"KV policy {p.name!r} ({p.entry.plugin})")
        out["evaluation"] = pick(needs, "the evaluation")
        for p in plan.kv_pruners:
            out[f"kv pruner {p.name}"] = out["evaluation"]
    for name in sorted(set(out.values())):
        check = getattr(reg.engine(name), "check", None)
        if check is not None:
            check(cfg)
    return out


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
