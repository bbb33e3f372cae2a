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


def test_rounds_sample_with_the_previous_adapter_and_report_each_round(tmp_path):
    """rounds=2: round 2 samples on round 1's adapter (other samples, other cache keys), its trainer
    continues that adapter, each round is in the report, and a rerun recomputes nothing. The engine the
    sampler loaded is released before each trainer runs and loads again for the next round."""
    from thinkpress.core.data import Example, TrainingSet, TrainResult
    from thinkpress.core.stages import Selector, Trainer

    seen: list[str | None] = []
    loaded: list[list[str]] = []

    class RecordingTrainer(Trainer):  # a test double for the core's loop: writes a marker "adapter"
        name = "recording-trainer"

        def train(self, data, ctx):
            seen.append(ctx.adapter)
            loaded.append(ctx.run.loaded_engines())
            out = ctx.workdir / "adapter"
            out.mkdir(parents=True, exist_ok=True)
            (out / "from.txt").write_text(str(ctx.adapter))
            return TrainResult(adapter_path=str(out), metrics={"steps": 1, "loss_first": 1.0, "loss_last": 0.5})

    class KeepAll(Selector):  # the fake engine solves nothing: keep every sample as an example
        name = "keep-all"

        def select(self, samples, problems, ctx):
            return TrainingSet(examples=[Example(id=f"{s.problem_id}#{s.index}", problem_id=s.problem_id,
                                                 prompt=s.prompt, completion=s.completion) for s in samples])

    engines = thinkpress.hookimpl(lambda register: register("fake", FakeEngine.factory))
    trainers = thinkpress.hookimpl(lambda register: register(RecordingTrainer))
    selectors = thinkpress.hookimpl(lambda register: register(KeepAll))
    reg = build_registry(load_entry_points=False, extra_plugins={
        "fake-engine": SimpleNamespace(register_engines=engines, register_trainers=trainers,
                                       register_selectors=selectors)})

    def run(name):
        cfg = build_config(preset="smoke", overrides={"plugins": ["baseline"], "out": str(tmp_path / name)},
                           sets=["engine=fake", "rounds=2", "eval.every_round=true",
                                 "stages.trainer=recording-trainer", "stages.selector=keep-all",
                                 "components.rejection-sampler.n=8",
                                 "train_data.limit=16", "test_data.limit=8", f"cache_dir={tmp_path / 'cache'}"],
                           registry=reg)
        runner = Runner(cfg, registry=reg, ui=UI(quiet=True))
        return runner, runner.run()

    runner, report = run("a")
    r1, r2 = runner.executor.rounds
    assert seen == [None, r1["adapter"]] and r1["key"] != r2["key"]
    assert loaded == [[], []]  # the sampler's engine was released before each round's training
    assert (tmp_path / "cache" / r2["key"] / "adapter" / "from.txt").read_text() == r1["adapter"]
    st = report["stages"]
    s1, s2 = st["r1-1-sampler-rejection-sampler"], st["r2-1-sampler-rejection-sampler"]
    assert s1["key"] != s2["key"] and s1["stats"]["samples"] == s2["stats"]["samples"] == 128
    samples = [(tmp_path / "cache" / s["key"] / "samples.jsonl").read_text() for s in (s1, s2)]
    assert samples[0] != samples[1]  # the fake engine salts its outputs with the adapter: round 2 drew others
    names = [v["name"] for v in report["variants"]]
    assert names == ["base", "trained@round1", "trained"]
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Rounds" in md and "| 2 | 128 |" in md
    # the engines each stage used: the sampler the fake engine, the trainer (its own "model") none
    assert s1["engine"] == "fake" and st["r2-3-trainer-recording-trainer"]["engine"] == "none"
    assert st["r1-2-selector-keep-all"]["engine"] == "none"
    assert report["plan"]["engines"]["trainer recording-trainer"] == "fake"  # assigned, never asked for
    assert "sampler rejection-sampler: `fake`" in md and "trainer recording-trainer: `none`" in md
    # the same config again: every stage of both rounds comes from the cache, the trainer never runs
    seen.clear()
    _, again = run("b")
    assert seen == [] and all(s["cached"] for s in again["stages"].values())
    assert again["variants"] == report["variants"]


def test_a_variants_response_prefix_is_fed_after_the_generation_prompt_and_keys_its_evaluation(tmp_path,
                                                                                                fake_prompts):
    from thinkpress.core.evaluator import Evaluator
    from thinkpress.core.stages import EvalVariant

    prompts = fake_prompts
    runner, _ = _run(tmp_path, "a")
    ev: Evaluator = runner.evaluator
    ts = runner.result.primary.test_set
    plain, tagged = EvalVariant("plain"), EvalVariant("plain", response_prefix=" So we")
    assert ev.eval_key(plain, ts) != ev.eval_key(tagged, ts)
    prompts.clear()
    with_prefix = ev.evaluate_variant(tagged, ts)
    assert len(prompts) == len(ts.problems) and all(p.endswith("\nA: So we") for p in prompts)
    prompts.clear()
    assert ev.evaluate_variant(tagged, ts) == with_prefix and prompts == []  # cached under its own key
    ev.evaluate_variant(plain, ts)
    assert len(prompts) == len(ts.problems) and not any(p.endswith(" So we") for p in prompts)
