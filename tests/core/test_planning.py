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
    with pytest.raises(ConfigError, match=r"refiner 'kl-step' \(tokensqueeze\) needs 'scoring'.*engine 'text-only' "
                                          r"provides generation only"):
        _plan(reg, ["tokensqueeze"], "text-only", "fallback_engine=null")
    assert _plan(reg, ["tokensqueeze"], "fake").engines["refiner kl-step"] == "fake"  # fake scores


def test_what_the_engine_lacks_runs_on_the_fallback_engine():
    reg = _registry()
    plan = _plan(reg, ["tokensqueeze"], "text-only", "eval.enabled=false")
    assert plan.engines == {"sampler self-sampler": "text-only", "selector q-dyn": "text-only",
                            "refiner kl-step": "hf", "trainer dpo-l": "text-only"}
    with pytest.raises(ConfigError, match=r"kl-step' \(tokensqueeze\) needs 'scoring', .*engine 'text-only' "
                                          r"provides generation only"):
        _plan(reg, ["tokensqueeze"], "fake", "fallback_engine=text-only", "engine=text-only", "eval.enabled=false")
    with pytest.raises(ConfigError, match="fallback_engine: unknown engine 'nope'"):
        _plan(reg, ["tokensqueeze"], "text-only", "fallback_engine=nope")


def test_evaluation_needs_are_checked_too():
    reg = _registry()
    with pytest.raises(ConfigError, match=r"the evaluation needs '(kv_policy|forced_decode)'"):
        _plan(reg, ["rkv"], "fake", "fallback_engine=null")
    plan = _plan(reg, ["rkv"], "fake")  # KV variants and their full-cache references all decode on hf
    assert plan.eval_engine == "hf" and plan.engines["kv pruner rkv"] == "hf"
    with pytest.raises(ConfigError, match=r"needs 'adapters' \(evaluating the trained adapter\)"):
        _plan(reg, ["baseline"], "text-only", "fallback_engine=null")
    assert _plan(reg, ["baseline"], "text-only").eval_engine == "hf"
    _plan(reg, ["baseline"], "text-only", "eval.enabled=false", "fallback_engine=null")  # no adapter needed


def test_a_token_scorer_needs_scoring_only_when_it_scores_with_the_run_engine():
    reg = _registry()
    with pytest.raises(ConfigError, match="pruner 'tokenskip' .*needs 'scoring'"):
        _plan(reg, ["tokenskip"], "text-only", "eval.enabled=false", "fallback_engine=null")
    _plan(reg, ["tokenskip"], "text-only", "eval.enabled=false",
          "components.tokenskip.scorer_options={model: smollm2-135m}")


def test_the_engine_and_its_options_enter_cache_keys_except_plain_hf():
    from thinkpress.core.planning import engine_identity

    cfg = build_config(preset="smoke", registry=_registry())
    assert engine_identity(cfg, "hf") == []  # caches of runs made before engines were selectable stay valid
    assert engine_identity(cfg, "vllm") == ["vllm", {}]
    tp = build_config(preset="smoke", sets=["engine_options.vllm.max_num_seqs=8"], registry=_registry())
    assert engine_identity(tp, "vllm") != engine_identity(cfg, "vllm")


def test_a_stage_on_the_fallback_engine_is_keyed_by_the_run_engine_it_samples_on():
    from thinkpress.core.planning import stage_engine_identity

    hf = build_config(preset="smoke", registry=_registry())
    vl = build_config(preset="smoke", sets=["engine=vllm"], registry=_registry())
    assert stage_engine_identity(hf, "hf") == []  # an all-hf run keeps its keys
    assert stage_engine_identity(vl, "vllm") == ["vllm", {}]
    # the KL refiner scores on hf in both runs but draws its candidates on the run's engine: different keys
    assert stage_engine_identity(vl, "hf") == ["generator", "vllm", {}] != stage_engine_identity(hf, "hf")


def test_a_component_checks_its_config_against_the_other_planned_components_before_the_run():
    """check_plan: TokenSkip's trainer refuses to evaluate a ratio its pruner does not train, at plan time."""
    reg = _registry()
    only_half = "components.tokenskip.gammas=[0.5]"
    plan = _plan(reg, ["tokenskip"], "fake", only_half, "components.tokenskip-sft.eval_gammas=[0.5, 1.0]")
    assert plan.trainer.instance.config.eval_gammas == [0.5, 1.0]
    with pytest.raises(ConfigError, match=r"components\.tokenskip-sft\.eval_gammas: \[0\.7\] would not be trained; "
                                          r"components\.tokenskip\.gammas trains \[0\.5, 1\.0\]"):
        _plan(reg, ["tokenskip"], "fake", only_half, "components.tokenskip-sft.eval_gammas=[0.7]")
    _plan(reg, ["tokenskip"], "fake", "components.tokenskip-sft.eval_gammas=[0.7]")  # the default gammas train it
