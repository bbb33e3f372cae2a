"""The runner end to end on the weightless fake engine: seconds, no model (the core's fast path)."""

import json
from types import SimpleNamespace

import thinkpress
from thinkpress.core.config import build_config
from thinkpress.core.context import UI
from thinkpress.core.engines.fake import FakeEngine
from thinkpress.core.plugins import build_registry
from thinkpress.core.runner import Runner


def _registry():
    engines = thinkpress.hookimpl(lambda register: register("fake", FakeEngine.factory))
    plugin = SimpleNamespace(register_engines=engines)
    return build_registry(load_entry_points=False, extra_plugins={"fake-engine": plugin})


def _run(tmp_path, name):
    reg = _registry()
    cfg = build_config(preset="smoke", overrides={"plugins": [], "out": str(tmp_path / name)},
                       sets=["engine=fake", "test_data=[{name: arith, split: test, limit: 12}, "
                             "{name: gsm8k, split: test, limit: 6, label: gsm8k-6}]",
                             f"cache_dir={tmp_path / 'cache'}"], registry=reg)
    runner = Runner(cfg, registry=reg, ui=UI(quiet=True))
    return runner, runner.run()


def test_an_evaluation_run_writes_a_report_per_test_set_and_reuses_its_cache(tmp_path):
    runner, report = _run(tmp_path, "a")
    assert [ts["name"] for ts in report["test_sets"]] == ["arith", "gsm8k-6"]
    assert [ts["dataset"]["n"] for ts in report["test_sets"]] == [12, 6]
    base = report["test_sets"][0]["variants"][0]
    assert base["name"] == "base" and base["n"] == 12 and 0 <= base["accuracy"] <= 1
    assert base["accuracy_ci"][0] <= base["accuracy"] <= base["accuracy_ci"][1]
    assert report["variants"] == report["test_sets"][0]["variants"]  # the contract: the primary set
    assert report["nondeterminism"] == ["engine 'fake': run-to-run determinism not established"]
    assert runner.result.primary.get("base").reference == "base" and runner.result.plan.train is False
    preds = (tmp_path / "a" / "eval" / "gsm8k-6" / "base" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 6 and all(json.loads(p)["completion"] for p in preds)
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Evaluation: arith (test, n=12)" in md and "## Evaluation: gsm8k-6 (test, n=6)" in md
    # a second run of the same config in another directory reads the cached evaluations: same numbers
    _, again = _run(tmp_path, "b")
    assert again["test_sets"] == report["test_sets"]


def test_engines_load_once_per_name_and_adapter_and_are_closed_once(tmp_path):
    from thinkpress.core.context import RunState
    from thinkpress.core.store import RunStore

    reg = _registry()
    cfg = build_config(preset="smoke", sets=["engine=fake"], registry=reg)
    state = RunState(cfg, reg, RunStore(tmp_path / "run", tmp_path / "c"), UI(quiet=True))
    base = state.engine()
    assert state.engine(name="fake") is base and state.engine(adapter=str(tmp_path)) is not base
    assert state.engine(adapter=str(tmp_path)) is state.engine(adapter=str(tmp_path), name="fake")
    closed = []
    base.close = lambda: closed.append("base")
    state.engine(adapter=str(tmp_path)).close = lambda: closed.append("adapter view")
    state.close()
    assert closed == ["base"] and state.engine() is not base  # closed engines are dropped, a new one loads
