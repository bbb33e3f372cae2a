import json

import pytest

from thinkpress.core.config import PRESETS, RunConfig, build_config, parse_set
from thinkpress.core.errors import ConfigError
from thinkpress.core.pipeline import Runner


def test_presets_resolve_and_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\nseed: 5\ntest_data: {limit: 3}\n")
    cfg = build_config(config_file=f, overrides={"model": "smollm2-135m"}, sets=["seed=7", "eval.generation.top_p=0.5"])
    assert cfg.preset == "smoke" and cfg.seed == 7 and cfg.test_data[0].limit == 3
    assert cfg.test_data[0].difficulty == PRESETS["smoke"]["test_data"][0]["difficulty"]  # preset value kept
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


def test_kv_policies_evaluate_on_smaller_test_sets_than_the_main_job():
    main_job = build_config(overrides={"plugins": ["tokensqueeze"]})
    kv = build_config(overrides={"plugins": ["rkv"]})
    assert [(d.name, d.limit) for d in main_job.test_data] == [("gsm8k", 300), ("arith", 48)]
    assert [(d.name, d.limit) for d in kv.test_data] == [("gsm8k", 48), ("arith", 48)]
    assert kv.components["rkv"]["budgets"] == [64, 128]
