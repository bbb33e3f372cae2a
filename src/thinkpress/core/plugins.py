"""Plugin manager, discovery and the component registry.

Discovery, in the style of simonw/llm and pytest:

* third-party plugins come from the entry-point group ``thinkpress``
  (``[project.entry-points.thinkpress] myplugin = "thinkpress_myplugin"``); the entry-point name is
  the plugin name used by ``--plugins``;
* built-in plugins are registered last (so a third-party wrapper of ``run_stage`` runs outside
  the core's implementation);
* ``THINKPRESS_LOAD_PLUGINS=a,b`` loads only those third-party plugins (empty: none);
* ``pm.check_pending()`` rejects hook implementations that match no spec (misspelt hooks);
* a plugin that fails to import, or whose registration hook raises, is recorded as *broken* with
  its entry point, distribution and error, and skipped: the CLI keeps working.

``--plugins`` names resolve only to installed entry points and built-ins, never to a module path.
"""

from __future__ import annotations

import importlib
import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from thinkpress.core import hookspecs
from thinkpress.core.config import deep_merge
from thinkpress.core.errors import ConfigError, PluginError, ThinkpressError
from thinkpress.core.stages import STAGE_BASES, Component, KVPruner

ENTRY_POINT_GROUP = "thinkpress"

STAGE_HOOKS = {
    "sampler": "register_samplers",
    "selector": "register_selectors",
    "refiner": "register_refiners",
    "pruner": "register_pruners",
    "trainer": "register_trainers",
}


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str | None = None
    distribution: str | None = None
    entry_point: str | None = None
    builtin: bool = False
    broken: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)  # stage -> component names
    bundle: list[str] = field(default_factory=list)  # members, when this name is a bundle

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "distribution": self.distribution,
            "entry_point": self.entry_point,
            "module": self.module,
            "builtin": self.builtin,
            "broken": self.broken,
            "hooks": self.hooks,
            "stages": self.components,
            "bundle": self.bundle,
        }


@dataclass
class ComponentEntry:
    cls: type[Component]
    plugin: str
    stage: str

    @property
    def name(self) -> str:
        return self.cls.name


class Registry:
    """All registered components, engines, datasets and scorers, each with its owning plugin."""

    def __init__(self, pm: pluggy.PluginManager, plugins: dict[str, PluginInfo]):
        self.pm = pm
        self.plugins = plugins
        self.components: dict[str, dict[str, ComponentEntry]] = {s: {} for s in STAGE_HOOKS}
        self.engines: dict[str, tuple[Any, str]] = {}
        self.datasets: dict[str, tuple[Any, str]] = {}
        self.scorers: dict[str, tuple[Any, str]] = {}
        self.presets: dict[str, list[tuple[dict[str, Any], str]]] = {}
        """preset -> (settings, plugin) that apply whenever the preset is used, in layering order."""
        self.overlays: dict[str, dict[str, list[dict[str, Any]]]] = {}
        """preset -> plugin -> settings that apply only when the plugin is selected."""
        self.bundles: dict[str, tuple[list[str], str, str]] = {}
        """bundle name -> (member plugins, description, declaring plugin)."""

    # -- lookups -------------------------------------------------------------------------------
    def expand_plugins(self, names: list[str]) -> list[str]:
        """``--plugins`` with bundles replaced by their members (order kept, duplicates dropped)."""
        out: list[str] = []
        for n in names:
            for m in self.bundles[n][0] if n in self.bundles else [n]:
                if m not in out:
                    out.append(m)
        return out

    def preset_settings(self, preset: str, selected: list[str]) -> dict[str, Any]:
        """The settings of ``preset`` for a run that selects ``selected`` (see the ``register_presets`` hook)."""
        if preset not in self.presets:
            raise ConfigError(f"preset: unknown preset {preset!r}; available: {', '.join(sorted(self.presets))}")
        out: dict[str, Any] = {}
        for settings, _ in self.presets[preset]:
            out = deep_merge(out, settings)
        for plugin in self.expand_plugins([p for p in selected if p in self.plugins or p in self.bundles]):
            for settings in self.overlays.get(preset, {}).get(plugin, []):
                out = deep_merge(out, settings)
        return out

    def component(self, stage: str, name: str) -> ComponentEntry:
        try:
            return self.components[stage][name]
        except KeyError:
            avail = ", ".join(sorted(self.components[stage])) or "none"
            raise PluginError(f"unknown {stage} {name!r}; available: {avail}") from None

    def by_plugin(self, stage: str, plugin: str) -> list[ComponentEntry]:
        return [e for e in self.components[stage].values() if e.plugin == plugin]

    def find_component(self, name: str) -> ComponentEntry | None:
        for stage in self.components.values():
            if name in stage:
                return stage[name]
        return None

    def working_plugins(self) -> list[str]:
        return [n for n, p in self.plugins.items() if not p.broken]

    def require_plugins(self, names: list[str]) -> None:
        avail = self.working_plugins()
        for n in names:
            info = self.plugins.get(n)
            if info is None:
                raise PluginError(f"unknown plugin {n!r}; available plugins: {', '.join(sorted(avail))}")
            if info.broken:
                raise PluginError(f"plugin {n!r} is broken and cannot be used: {info.broken.splitlines()[-1]}")

    def engine(self, name: str):
        if name not in self.engines:
            raise PluginError(f"unknown engine {name!r}; available: {', '.join(sorted(self.engines))}")
        return self.engines[name][0]

    def auto_engine(self, cfg: Any) -> str:
        """``engine: auto``: the first registered engine whose factory sets ``auto = True`` and whose
        ``check(cfg)`` passes here (vllm when importable), else ``cfg.fallback_engine`` (hf)."""
        for name, (factory, _plugin) in self.engines.items():
            if getattr(factory, "auto", False):
                try:
                    getattr(factory, "check", lambda c: None)(cfg)
                except ThinkpressError:
                    continue
                return name
        return cfg.fallback_engine or "hf"

    def engine_capabilities(self, name: str) -> frozenset[str]:
        """What engine ``name`` declares it can do (its factory's ``capabilities``; none: generation only)."""
        return frozenset(str(c) for c in getattr(self.engine(name), "capabilities", ()))

    def dataset(self, name: str):
        if name not in self.datasets:
            raise PluginError(f"unknown dataset {name!r}; available: {', '.join(sorted(self.datasets))}")
        return self.datasets[name][0]

    def scorer(self, name: str):
        if name not in self.scorers:
            raise PluginError(f"unknown scorer {name!r}; available: {', '.join(sorted(self.scorers))}")
        return self.scorers[name][0]


def _version_of(dist: str | None, module: Any) -> str | None:
    if dist:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return getattr(module, "__version__", None)


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _builtin_names() -> set[str]:
    from thinkpress.plugins import BUILTIN_PLUGINS

    return set(BUILTIN_PLUGINS)


def _hooks_of(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    return sorted(h.name for h in (pm.get_hookcallers(plugin) or []))


def build_plugin_manager(
    load_entry_points: bool = True, extra_plugins: dict[str, Any] | None = None
) -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """Create the plugin manager: entry-point plugins, then ``extra_plugins`` (objects registered
    programmatically, e.g. in tests or notebooks), then the built-ins."""
    pm = pluggy.PluginManager("thinkpress")
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}

    allowed = os.environ.get("THINKPRESS_LOAD_PLUGINS")
    allow = None if allowed is None else {p.strip() for p in allowed.split(",") if p.strip()}
    if load_entry_points:
        for ep in _entry_points():
            if allow is not None and ep.name not in allow:
                continue
            dist = ep.dist.name if ep.dist is not None else None
            info = PluginInfo(name=ep.name, module=ep.value, distribution=dist, entry_point=f"{ep.name} = {ep.value}")
            infos[ep.name] = info
            if ep.name in _builtin_names():
                info.broken = f"entry point {ep.name!r} shadows a built-in plugin name; rename it"
                continue
            try:
                mod = ep.load()
                info.version = _version_of(dist, mod)
                pm.register(mod, name=ep.name)
                pm.check_pending()
            except Exception as e:  # noqa: BLE001 - any failure marks the plugin broken
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                info.broken = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                continue
            info.hooks = _hooks_of(pm, mod)

    for name, obj in (extra_plugins or {}).items():
        info = infos[name] = PluginInfo(name=name, module=getattr(obj, "__name__", type(obj).__name__))
        try:
            pm.register(obj, name=name)
            pm.check_pending()
        except Exception as e:  # noqa: BLE001
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            info.broken = f"{type(e).__name__}: {e}"
            continue
        info.hooks = _hooks_of(pm, obj)

    from thinkpress import __version__
    from thinkpress.plugins import BUILTIN_PLUGINS

    for name, modname in BUILTIN_PLUGINS.items():
        mod = importlib.import_module(modname)
        pm.register(mod, name=name)
        infos[name] = PluginInfo(name=name, module=modname, version=__version__, distribution="thinkpress",
                                 builtin=True)
        infos[name].hooks = _hooks_of(pm, mod)
    pm.check_pending()
    return pm, infos


def _call_registration(pm, infos, registry: Registry, hook_name: str, make_register) -> None:
    caller = getattr(pm.hook, hook_name)
    # Built-ins (registered last) are collected first: a name clash then breaks the third-party
    # plugin, never the core.
    for impl in reversed(caller.get_hookimpls()):
        plugin = impl.plugin_name
        info = infos.get(plugin)
        if info is None or info.broken:
            continue
        try:
            impl.function(**{impl.argnames[0]: make_register(plugin)})
        except Exception as e:  # noqa: BLE001
            info.broken = f"{hook_name} raised {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def build_registry(load_entry_points: bool = True, extra_plugins: dict[str, Any] | None = None) -> Registry:
    """Discover plugins and collect every component they register."""
    pm, infos = build_plugin_manager(load_entry_points, extra_plugins)
    reg = Registry(pm, infos)

    for stage, hook in STAGE_HOOKS.items():

        def make_register(plugin, stage=stage, hook=hook):
            def register(cls):
                bases = STAGE_BASES[stage]
                if not (isinstance(cls, type) and issubclass(cls, bases)):
                    raise PluginError(f"{hook}: {cls!r} is not a subclass of {' or '.join(b.__name__ for b in bases)}")
                if not cls.name:
                    raise PluginError(f"{hook}: {cls.__name__} has no name")
                _check_config_described(cls)
                existing = reg.find_component(cls.name)
                if existing is not None:
                    raise PluginError(
                        f"component name {cls.name!r} registered by both {existing.plugin!r} and {plugin!r}"
                    )
                reg.components[stage][cls.name] = ComponentEntry(cls=cls, plugin=plugin, stage=stage)
                infos[plugin].components.setdefault(stage, []).append(cls.name)

            return register

        _call_registration(pm, infos, reg, hook, make_register)

    for hook, table in (
        ("register_engines", reg.engines),
        ("register_datasets", reg.datasets),
        ("register_scorers", reg.scorers),
    ):

        def make_register(plugin, table=table, hook=hook):
            def register(name, factory):
                if name in table:
                    raise PluginError(f"{hook}: {name!r} registered by both {table[name][1]!r} and {plugin!r}")
                table[name] = (factory, plugin)

            return register

        _call_registration(pm, infos, reg, hook, make_register)

    def make_preset_register(plugin):
        def register(preset, settings, *, when_selected=False):
            if not isinstance(preset, str) or not isinstance(settings, dict):
                raise PluginError(f"register_presets: expected (preset name, settings mapping), got {preset!r}")
            if when_selected:
                reg.overlays.setdefault(preset, {}).setdefault(plugin, []).append(settings)
            else:
                reg.presets.setdefault(preset, []).append((settings, plugin))

        return register

    def make_bundle_register(plugin):
        def register(name, members, description=""):
            if name in reg.bundles:
                other = reg.bundles[name][2]
                raise PluginError(f"register_bundles: {name!r} declared by both {other!r} and {plugin!r}")
            if name in infos and name != plugin:
                raise PluginError(f"register_bundles: {name!r} is already a plugin name")
            reg.bundles[name] = (list(members), description, plugin)

        return register

    _call_registration(pm, infos, reg, "register_presets", make_preset_register)
    _call_registration(pm, infos, reg, "register_bundles", make_bundle_register)
    for name, (members, _, _) in reg.bundles.items():
        if name in infos:
            infos[name].bundle = members

    # A plugin that broke during registration must not leave half its components behind.
    for stage in reg.components.values():
        for cname in [n for n, e in stage.items() if infos[e.plugin].broken]:
            del stage[cname]
    for table in (reg.engines, reg.datasets, reg.scorers):
        for key in [k for k, (_, p) in table.items() if infos[p].broken]:
            del table[key]
    for preset in reg.presets:
        reg.presets[preset] = [(st, p) for st, p in reg.presets[preset] if not infos[p].broken]
    for by_plugin in reg.overlays.values():
        for p in [p for p in by_plugin if infos[p].broken]:
            del by_plugin[p]
    for name in [n for n, (_, _, p) in reg.bundles.items() if infos[p].broken]:
        del reg.bundles[name]
    for info in infos.values():
        if info.broken and not info.builtin and info.name in [p[0] for p in pm.list_name_plugin()]:
            pm.unregister(name=info.name)
    return reg


def _check_config_described(cls: type[Component]) -> None:
    cfg = cls.Config
    if cfg.model_config.get("extra") != "forbid":
        raise PluginError(f"{cls.__name__}.Config must forbid extra keys (subclass ComponentConfig)")
    missing = [n for n, f in cfg.model_fields.items() if not f.description]
    if missing:
        raise PluginError(f"{cls.__name__}.Config fields without a description: {', '.join(missing)}")


def is_kv(entry: ComponentEntry) -> bool:
    return issubclass(entry.cls, KVPruner)


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (built on first use)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = build_registry()
    return _REGISTRY
