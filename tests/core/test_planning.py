"""Plan-time checks: a plan that needs what the chosen engine cannot do is refused before any work."""

from types import SimpleNamespace

import pytest

import thinkpress
from thinkpress.core.config import build_config
from thinkpress.core.engines.fake import FakeEngine
from thinkpress.core.errors import ConfigError
from thinkpress.core.planning import resolve_plan
from thinkpress.core.plugins import build_registry


def _registry():
    def engines(register):
        register("fake", FakeEngine.factory)  # scoring + adapters

        def text_only(config):
            raise AssertionError("the plan check must not build the engine")

        register("text-only", text_only)  # declares nothing: generation only

    return build_registry(load_entry_points=False,
                          extra_plugins={"fakes": SimpleNamespace(register_engines=thinkpress.hookimpl(engines))})


def _plan(reg, plugins, engine, *sets):
    cfg = build_config(preset="smoke", overrides={"plugins": plugins}, sets=[f"engine={engine}", *sets], registry=reg)
    return resolve_plan(cfg, reg)


def test_a_component_that_needs_scoring_is_refused_by_an_engine_without_it():
    reg = _registry()
    assert reg.engine_capabilities("hf") == {"scoring", "forced_decode", "kv_policy", "adapters"}
    assert reg.engine_capabilities("text-only") == frozenset()
    with pytest.raises(ConfigError, match=r"'text-only' does not provide 'scoring', which refiner 'kl-step'"):
        _plan(reg, ["tokensqueeze"], "text-only")
    _plan(reg, ["tokensqueeze"], "fake")  # fake scores: kl-step may run on it


def test_evaluation_needs_are_checked_too():
    reg = _registry()
    with pytest.raises(ConfigError, match="'fake' does not provide 'kv_policy', which kv pruner 'rkv'"):
        _plan(reg, ["rkv"], "fake")
    with pytest.raises(ConfigError, match="does not provide 'adapters', which evaluating the trained adapter"):
        _plan(reg, ["baseline"], "text-only")
    _plan(reg, ["baseline"], "text-only", "eval.enabled=false")  # no evaluation: no adapter needed


def test_a_token_scorer_needs_scoring_only_when_it_scores_with_the_run_engine():
    reg = _registry()
    with pytest.raises(ConfigError, match="'scoring', which pruner 'tokenskip'"):
        _plan(reg, ["tokenskip"], "text-only", "eval.enabled=false")
    _plan(reg, ["tokenskip"], "text-only", "eval.enabled=false",
          "components.tokenskip.scorer_options={model: smollm2-135m}")
