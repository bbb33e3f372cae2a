"""One test per hook (test_hook_<name>), plus the documentation check for every hookspec."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner
from pydantic import Field

import thinkpress
from thinkpress.core import hookspecs
from thinkpress.core.data import Example, Problem, TrainingSet, TrainResult
from thinkpress.core.plugins import build_registry
from thinkpress.core.stages import (
    ComponentConfig,
    KVPruner,
    Refiner,
    Sampler,
    Selector,
    TracePruner,
    Trainer,
)

ROOT = Path(__file__).resolve().parents[2]
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "thinkpress_spec"))


def registry_with(**plugins):
    return build_registry(load_entry_points=False, extra_plugins=plugins)


def _plugin(**hooks):
    return SimpleNamespace(**{k: thinkpress.hookimpl(v) for k, v in hooks.items()})


class MySampler(Sampler):
    name = "my-sampler"

    class Config(ComponentConfig):
        n: int = Field(default=1, description="samples")

    def sample(self, problems, ctx):
        return []


class MySelector(Selector):
    name = "my-selector"

    def select(self, samples, problems, ctx):
        return TrainingSet()


class MyRefiner(Refiner):
    name = "my-refiner"

    def refine(self, data, ctx):
        return data


class MyPruner(TracePruner):
    name = "my-pruner"

    def prune(self, data, ctx):
        return data


class MyKV(KVPruner):
    name = "my-kv"

    def make_policy(self, params):
        from thinkpress.core.engines.base import KVPolicy

        return KVPolicy()


class MyTrainer(Trainer):
    name = "my-trainer"

    def train(self, data, ctx):
        return TrainResult(adapter_path=None)


def test_every_hook_is_documented_and_tested():
    doc = (ROOT / "docs" / "plugin_hooks.md").read_text()
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for name in HOOKS:
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and ":param" in spec.__doc__ and ":return" in spec.__doc__, f"{name}: incomplete docstring"
        assert re.search(rf"^## `?{name}`?", doc, re.M), f"docs/plugin_hooks.md has no section for {name}"
        assert f"def test_hook_{name}" in tests_text, f"no test named test_hook_{name}"
    assert len(HOOKS) == 12


def test_hook_register_samplers():
    reg = registry_with(mine=_plugin(register_samplers=lambda register: register(MySampler)))
    entry = reg.component("sampler", "my-sampler")
    assert entry.plugin == "mine" and entry.cls is MySampler
    assert reg.plugins["mine"].components == {"sampler": ["my-sampler"]}


def test_hook_register_selectors():
    reg = registry_with(mine=_plugin(register_selectors=lambda register: register(MySelector)))
    assert reg.by_plugin("selector", "mine")[0].cls is MySelector


def test_hook_register_refiners():
    reg = registry_with(mine=_plugin(register_refiners=lambda register: register(MyRefiner)))
    assert reg.component("refiner", "my-refiner").plugin == "mine"


def test_hook_register_pruners():
    def reg_fn(register):
        register(MyPruner)
        register(MyKV)

    reg = registry_with(mine=_plugin(register_pruners=reg_fn))
    assert {e.name for e in reg.by_plugin("pruner", "mine")} == {"my-pruner", "my-kv"}


def test_hook_register_trainers():
    reg = registry_with(mine=_plugin(register_trainers=lambda register: register(MyTrainer)))
    assert reg.component("trainer", "my-trainer").plugin == "mine"


def test_register_rejects_wrong_base_and_marks_plugin_broken():
    reg = registry_with(bad=_plugin(register_samplers=lambda register: register(MySelector)))
    assert reg.plugins["bad"].broken and "not a subclass of Sampler" in reg.plugins["bad"].broken
    assert "my-selector" not in reg.components["sampler"]
    assert reg.component("sampler", "rejection-sampler")  # built-ins unaffected


def test_register_rejects_undescribed_config_field():
    class Undescribed(Sampler):
        name = "undescribed"

        class Config(ComponentConfig):
            n: int = 1

        def sample(self, problems, ctx):
            return []

    reg = registry_with(bad=_plugin(register_samplers=lambda register: register(Undescribed)))
    assert "without a description: n" in reg.plugins["bad"].broken


def test_hook_register_engines():
    made = []
    reg = registry_with(mine=_plugin(register_engines=lambda register: register("fake", lambda cfg: made.append(cfg))))
    assert set(reg.engines) == {"hf", "vllm", "fake"}
    reg.engine("fake")("cfg")
    assert made == ["cfg"] and reg.engines["fake"][1] == "mine"


def test_hook_register_datasets():
    def loader(split, path=None, limit=None, seed=0, shuffle=False, skip_invalid=False, stats=None):
        return [Problem(id=f"{split}-0", question="1+1?", answer="2")]

    reg = registry_with(mine=_plugin(register_datasets=lambda register: register("tiny", loader)))
    assert reg.dataset("tiny")("test")[0].id == "test-0"
    assert {"arith", "gsm8k", "math500", "jsonl"} <= set(reg.datasets)


def test_hook_register_scorers():
    class LenScorer:
        def score(self, prompt, text):
            return [(w, float(len(w))) for w in text.split()]

    reg = registry_with(mine=_plugin(register_scorers=lambda register: register("len", LenScorer)))
    assert reg.scorer("len")().score("", "a bbb") == [("a", 1.0), ("bbb", 3.0)]
    with pytest.raises(thinkpress.core.errors.PluginError, match="available: entropy, len, llmlingua2, self-inf"):
        reg.scorer("nope")
    assert reg.scorers["len"][1] == "mine" and reg.scorers["self-information"][1] == "tokenskip"


def test_duplicate_dataset_name_names_both_plugins():
    reg = registry_with(mine=_plugin(register_datasets=lambda register: register("arith", lambda *a, **k: [])))
    # Built-ins' components are collected first, so a clash breaks the third-party plugin, not the core.
    assert "registered by both 'core' and 'mine'" in (reg.plugins["mine"].broken or "")
    assert reg.plugins["core"].broken is None and reg.datasets["arith"][1] == "core"


def test_hook_register_commands(monkeypatch):
    from thinkpress.core import cli as cli_mod
    from thinkpress.core import plugins as plugins_mod

    def add(cli):
        @cli.command("hello")
        def hello():
            click.echo("hello from plugin")

    reg = registry_with(mine=_plugin(register_commands=add))
    monkeypatch.setattr(plugins_mod, "_REGISTRY", reg)
    group = click.Group(commands=dict(cli_mod.cli.commands))
    monkeypatch.setattr(cli_mod, "cli", group)
    cli_mod._add_plugin_commands()
    res = CliRunner().invoke(group, ["hello"])
    assert res.exit_code == 0 and "hello from plugin" in res.output


def test_register_commands_failure_does_not_stop_cli(monkeypatch):
    from thinkpress.core import cli as cli_mod
    from thinkpress.core import plugins as plugins_mod

    def boom(cli):
        raise RuntimeError("kaputt")

    reg = registry_with(bad=_plugin(register_commands=boom))
    monkeypatch.setattr(plugins_mod, "_REGISTRY", reg)
    group = click.Group(commands=dict(cli_mod.cli.commands))
    monkeypatch.setattr(cli_mod, "cli", group)
    cli_mod._add_plugin_commands()
    assert "kaputt" in reg.plugins["bad"].broken
    assert CliRunner().invoke(group, ["config", "schema"]).exit_code == 0


def test_hook_run_stage(tmp_path):
    """A wrapper sees every stage call and may replace the result; the core impl calls the component."""
    from thinkpress.core.context import StageContext

    seen = []

    class Wrapper:
        @thinkpress.hookimpl(wrapper=True)
        def run_stage(self, stage, component, inputs, ctx):
            seen.append((stage, component.name))
            result = yield
            return TrainingSet(examples=result.examples + [Example(id="x", problem_id="p", prompt="", completion="y")])

    reg = registry_with(wrap=Wrapper())
    comp = MyRefiner()
    ctx = StageContext(run=None, stage="refiner", component=comp.name, workdir=tmp_path, key="k")
    out = reg.pm.hook.run_stage(stage="refiner", component=comp, inputs={"data": TrainingSet()}, ctx=ctx)
    assert seen == [("refiner", "my-refiner")]
    assert [e.id for e in out.examples] == ["x"]


def test_misspelt_hook_marks_plugin_broken():
    reg = registry_with(typo=_plugin(register_sampler=lambda register: None))
    assert reg.plugins["typo"].broken and "register_sampler" in reg.plugins["typo"].broken


def test_hook_register_presets():
    from thinkpress.core.config import build_config

    def presets(register):
        register("default", {"components": {"my-sampler": {}}, "seed": 11})
        register("default", {"seed": 12}, when_selected=True)

    reg = registry_with(mine=_plugin(register_samplers=lambda register: register(MySampler),
                                     register_presets=presets))
    assert build_config(registry=reg).seed == 11  # unconditional: always
    assert build_config(overrides={"plugins": ["mine"]}, registry=reg).seed == 12  # when selected
    assert build_config(overrides={"plugins": ["mine"]}, sets=["seed=13"], registry=reg).seed == 13  # --set wins


def test_hook_register_bundles():
    reg = registry_with(mine=_plugin(register_bundles=lambda register: register("pair", ["rkv", "snapkv"], "two")))
    assert reg.expand_plugins(["pair"]) == ["rkv", "snapkv"] and reg.bundles["pair"][2] == "mine"
    clash = registry_with(bad=_plugin(register_bundles=lambda register: register("kvprune", ["rkv"], "again")))
    assert "declared by both" in clash.plugins["bad"].broken and clash.bundles["kvprune"][0][0] == "streaming"
