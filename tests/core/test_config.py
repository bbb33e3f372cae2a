import json

import pytest

from thinkpress.core.config import RunConfig, build_config, parse_set
from thinkpress.core.errors import ConfigError
from thinkpress.core.runner import Runner


def test_presets_resolve_and_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\nseed: 5\ntest_data: {limit: 3}\n")
    cfg = build_config(config_file=f, overrides={"model": "smollm2-135m"}, sets=["seed=7", "eval.generation.top_p=0.5"])
    assert cfg.preset == "smoke" and cfg.seed == 7 and cfg.test_data[0].limit == 3
    assert cfg.test_data[0].difficulty == [1]  # the smoke preset's value is kept
    assert cfg.eval.generation.top_p == 0.5
    assert build_config().model == "qwen2.5-coder-0.5b"  # default preset = the embedded default


def test_set_parses_yaml_values():
    assert parse_set("plugins=[a,b]") == (["plugins"], ["a", "b"])
    assert parse_set("components.x.lr=1e-4") == (["components", "x", "lr"], 1e-4)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_set("novalue")


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("seed: 1\nplugins: [a, b\nmodel: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+"):
        build_config(config_file=f)


@pytest.mark.parametrize(
    "sets, path",
    [
        (["train_data.limt=3"], "train_data.limt: unknown key"),
        (["seed=abc"], "seed: Input should be a valid integer"),
        (["eval.generation.top_p=1.5"], "eval.generation.top_p: Input should be less than or equal to 1"),
        (["train_data.limit=0"], "train_data.limit: Input should be greater than or equal to 1"),
        (["bogus=1"], "bogus: unknown key"),
    ],
)
def test_invalid_values_name_the_key_path(sets, path):
    with pytest.raises(ConfigError) as e:
        build_config(sets=sets)
    assert path in str(e.value)


def test_component_config_errors_name_the_key_path_before_any_work(tmp_path):
    out = tmp_path / "run"
    cfg = build_config(preset="smoke", sets=["components.lora-sft.rank=zero", f"out={out}"])
    with pytest.raises(ConfigError, match=r"components\.lora-sft\.rank"):
        Runner(cfg)
    cfg = build_config(preset="smoke", sets=["components.lora-sft.rnak=4", f"out={out}"])
    with pytest.raises(ConfigError, match=r"components\.lora-sft\.rnak: unknown key"):
        Runner(cfg)
    cfg = build_config(preset="smoke", sets=["components.no-such.x=1", f"out={out}"])
    with pytest.raises(ConfigError, match="no component named 'no-such'; known components: .*keep-correct"):
        Runner(cfg)
    assert not out.exists()  # nothing written


def test_skip_invalid_rows_are_counted_before_work(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = '{"question": "1+1?", "answer": "#### 2"}\nnot json\n{"question": "2+2?", "answer": "#### 4"}\n'
    (d / "train.jsonl").write_text(rows)
    (d / "test.jsonl").write_text(rows)
    base = ["train_data.name=jsonl", f"train_data.path={d}", "test_data.name=jsonl", f"test_data.path={d}",
            f"out={tmp_path / 'run'}", "model=smollm2-135m"]
    from thinkpress.core.errors import DataError

    with pytest.raises(DataError, match=r"(train|test)\.jsonl:2: malformed JSONL row"):
        Runner(build_config(sets=base))
    runner = Runner(build_config(sets=[*base, "train_data.skip_invalid=true", "test_data.skip_invalid=true"]))
    assert runner.skipped_rows == {"train_data": 1, "test_data": 1} and len(runner.test_sets[0].problems) == 2
    assert not (tmp_path / "run").exists()


def test_test_data_is_a_list_of_sets_and_set_reaches_every_set_or_picks_one():
    cfg = build_config()  # the default preset: real problems next to generated ones
    assert [(d.name, d.limit, d.shuffle) for d in cfg.test_data] == [("gsm8k", 300, True), ("arith", 48, False)]
    assert [d.limit for d in build_config(sets=["test_data.limit=10"]).test_data] == [10, 10]
    assert [d.limit for d in build_config(sets=["test_data.1.limit=7"]).test_data] == [300, 7]
    one = build_config(sets=["test_data.name=math500"]).test_data  # naming a dataset picks one set
    assert [(d.name, d.limit) for d in one] == [("math500", 300)]
    assert len(build_config(overrides={"test_data": {"name": "arith"}}).test_data) == 1  # like --data
    with pytest.raises(ConfigError, match="test_data.*give them distinct `label`s"):
        build_config(sets=["test_data=[{name: arith}, {name: arith, limit: 3}]"])
    two = build_config(sets=["test_data=[{name: arith}, {name: arith, limit: 3, label: arith-3}]"]).test_data
    assert [d.display_name() for d in two] == ["arith", "arith-3"]
    with pytest.raises(ConfigError, match="test_data.0.limit"):
        build_config(sets=["test_data.0.limit=0"])


def test_config_hash_ignores_output_location():
    a = build_config(sets=["out=/tmp/a"])
    b = build_config(sets=["out=/tmp/b"])
    c = build_config(sets=["seed=1"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_schema_is_json_and_describes_fields():
    schema = RunConfig.model_json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert all("description" in p for p in schema["properties"].values())


def test_presets_come_from_the_plugins_that_own_the_components():
    from thinkpress.core.plugins import build_registry

    reg = build_registry(load_entry_points=False)
    owners = {p for st, p in reg.presets["default"]}
    assert {"core", "baseline", "tokensqueeze"} <= owners
    cfg = build_config()
    assert cfg.plugins == ["baseline"] and cfg.fallback.trainer == "lora-sft"  # baseline's settings
    assert cfg.components["dpo-l"]["lr"] == 5e-4  # tokensqueeze's
    assert "tokenskip-sft" not in cfg.components  # tokenskip's apply only when it is selected
    assert cfg.train_data.name == "arith" and cfg.stages.selector is None  # tokensqueeze's main-job data: below
    squeeze = build_config(overrides={"plugins": ["tokensqueeze"]})  # the main job: real problems, chosen selector
    assert (squeeze.train_data.name, squeeze.train_data.split, squeeze.train_data.limit) == ("gsm8k", "train", 12)
    assert squeeze.stages.selector == "fixed-quantile" and squeeze.components["self-sampler"]["n"] == 32
    assert squeeze.stages.refiners == [] and squeeze.engine_options["vllm"]["chunk_size"] == 320
    assert [d.name for d in squeeze.test_data] == ["gsm8k", "arith"] and squeeze.test_data[0].split == "test"
    assert build_config(overrides={"plugins": ["tokensqueeze"]}, sets=["stages.selector=q-dyn"]).stages.selector \
        == "q-dyn"
    skip = build_config(overrides={"plugins": ["tokenskip"]})
    assert skip.components["tokenskip-sft"]["epochs"] == 3 and skip.train_data.limit == 96
    bundle = build_config(overrides={"plugins": ["kvprune"]})  # a bundle brings its members' settings
    assert bundle.components["rkv"]["budgets"] == [64, 128] and bundle.components["rpc"]["period"] == 64
    with pytest.raises(ConfigError, match="unknown preset 'huge'; available: default, smoke"):
        build_config(preset="huge")


def test_a_plugin_can_declare_a_preset_and_a_bundle():
    from thinkpress import hookimpl
    from thinkpress.core.plugins import build_registry

    class Mine:
        @hookimpl
        def register_presets(self, register):
            register("tiny", {"model": "smollm2-135m", "seed": 3})
            register("tiny", {"seed": 4}, when_selected=True)

        @hookimpl
        def register_bundles(self, register):
            register("cheap-kv", ["streaming", "h2o"], "the two cheapest policies")

    reg = build_registry(load_entry_points=False, extra_plugins={"mine": Mine()})
    assert build_config(preset="tiny", registry=reg).seed == 3
    assert build_config(preset="tiny", overrides={"plugins": ["mine"]}, registry=reg).seed == 4
    assert reg.expand_plugins(["cheap-kv", "rkv", "h2o"]) == ["streaming", "h2o", "rkv"]
    assert reg.plugins["mine"].broken is None


def test_kv_policies_evaluate_on_smaller_test_sets_than_the_main_job():
    main_job = build_config(overrides={"plugins": ["tokensqueeze"]})
    kv = build_config(overrides={"plugins": ["rkv"]})
    assert [(d.name, d.limit) for d in main_job.test_data] == [("gsm8k", 300), ("arith", 48)]
    assert [(d.name, d.limit) for d in kv.test_data] == [("gsm8k", 48), ("arith", 48)]
    assert kv.components["rkv"]["budgets"] == [64, 128]


def test_the_paper_scale_config_file_is_valid_before_any_work(tmp_path):
    """configs/tokensqueeze-paper.yaml (for GPUs; never run here): every key and component setting is valid and
    the runner accepts it with its data loaded (the model, a Hub id, is fetched only when a stage loads it)."""
    from pathlib import Path

    paper = Path(__file__).resolve().parents[2] / "configs/tokensqueeze-paper.yaml"
    (tmp_path / "test.jsonl").write_text('{"problem": "1+1?", "answer": "2", "unique_id": "m/1", "level": 1}\n')
    cfg = build_config(config_file=paper, overrides={"plugins": ["tokensqueeze"]},
                       sets=[f"out={tmp_path / 'run'}", f"test_data.0.path={tmp_path}"])
    assert cfg.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and cfg.stages.selector == "q-dyn"
    assert cfg.stages.refiners == ["kl-step"]  # the paper's whole method, not the CPU preset's recipe
    assert cfg.components["kl-step"]["n_candidates"] == 64 and cfg.components["q-dyn"]["max_pairs"] == 64
    assert cfg.train_data.limit == 2000 and [d.name for d in cfg.test_data] == ["math500", "gsm8k"]
    try:
        runner = Runner(cfg)
    except ConfigError as e:  # the vLLM engine check on a machine without vLLM; the component keys passed before
        assert "vLLM" in str(e)
        return
    assert len(runner.train_problems) == 2000 and [len(t.problems) for t in runner.test_sets] == [1, 500]


def test_a_set_mapping_that_drops_preset_values_is_named_in_a_note():
    # the tokenskip default preset sets tokenskip-sft lr 5e-4; a mapping-valued --set replaces the whole mapping
    notes: list[str] = []
    cfg = build_config(preset="default", sets=["plugins=[tokenskip]", "components.tokenskip-sft={epochs: 5}"],
                       notes=notes)
    assert cfg.components["tokenskip-sft"] == {"epochs": 5}  # the replace itself is unchanged: it is what was asked
    assert len(notes) == 1 and "components.tokenskip-sft" in notes[0] and "lr=0.0005" in notes[0]
    assert "epochs" not in notes[0].split("dropping")[1]  # only what was dropped, not what was set
    leafwise: list[str] = []
    cfg = build_config(preset="default", sets=["plugins=[tokenskip]", "components.tokenskip-sft.epochs=5"],
                       notes=leafwise)
    sft = cfg.components["tokenskip-sft"]
    assert leafwise == [] and sft["lr"] == 5e-4 and sft["epochs"] == 5
    # a mapping over nothing, or one that names every key already there, drops nothing
    none: list[str] = []
    sets = ["plugins=[tokenskip]", "components.cot-filter={max_tokens: 400}",
            "components.greedy-sampler={max_new_tokens: 400, batch_size: 160}"]
    build_config(preset="default", sets=sets, notes=none)
    assert none == []
