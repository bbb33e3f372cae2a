"""`core ablate`: study files, variant expansion, the shared stage cache, resume, results (fake engine)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import yaml

from thinkpress.core import ablate
from thinkpress.core.errors import ConfigError
from thinkpress.core.store import RunStore

HERE = Path(__file__).resolve().parent


def calls() -> list[str]:
    f = Path(os.environ["THINKPRESS_TEST_CALLS"])
    return f.read_text().splitlines() if f.exists() else []


@pytest.fixture
def doubles(monkeypatch, tmp_path):
    """The study_doubles plugin module, importable here and in spawned workers; a fresh calls file."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("THINKPRESS_TEST_CALLS", str(tmp_path / "calls.txt"))


def _study(tmp_path: Path, **extra) -> Path:
    data = {"name": "tiny", "plugin_modules": ["study_doubles"], "base": {"preset": "smoke", "plugins": ["baseline"],
                                                                        "set": {
        "engine": "fake", "stages.selector": "keep-all", "stages.trainer": "salt-trainer",
        "components.rejection-sampler.n": 2, "train_data.limit": 4, "test_data.limit": 6}},
        "axes": [{"key": "components.salt-trainer.lr", "values": [1e-4, 1e-3]}]} | extra
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_expand_grid_zip_variants_and_seeds(tmp_path):
    s = ablate.Study.model_validate({"name": "s", "axes": [{"key": "a.b", "values": [1, 2]},
                                                           {"key": "c", "values": ["x", "y"], "labels": ["X", "Y"]}]})
    assert [n for n, _ in ablate.expand(s)] == ["b=1,c=X", "b=1,c=Y", "b=2,c=X", "b=2,c=Y"]
    z = s.model_copy(update={"combine": "zip", "seeds": [0, 1],
                             "variants": [ablate.Variant(name="off", set={"stages.refiners": []})]})
    assert ablate.expand(z) == [("b=1,c=X,seed=0", {"a.b": 1, "c": "x", "seed": 0}),
                                ("b=1,c=X,seed=1", {"a.b": 1, "c": "x", "seed": 1}),
                                ("b=2,c=Y,seed=0", {"a.b": 2, "c": "y", "seed": 0}),
                                ("b=2,c=Y,seed=1", {"a.b": 2, "c": "y", "seed": 1}),
                                ("off,seed=0", {"stages.refiners": [], "seed": 0}),
                                ("off,seed=1", {"stages.refiners": [], "seed": 1})]


@pytest.mark.parametrize("study_file", sorted((HERE.parents[1] / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_builds_a_valid_config_for_each_variant(study_file, tmp_path):
    study = ablate.load_study(study_file)
    variants = ablate.expand(study)
    cfgs = {n: ablate.variant_config(study, study_file, tmp_path, n, sets) for n, sets in variants}
    assert len(cfgs) == len(variants) >= 2 and (study.control is None or study.control in cfgs)
    runs = {json.dumps(c.model_dump(mode="json", exclude={"out"}), sort_keys=True) for c in cfgs.values()}
    assert len(runs) == len(cfgs)  # no two variants are the same run under two names
    # each variant differs from the control only where it says: a dict-valued set (`key: {a: 1}`) replaces the
    # whole value at `key`, silently dropping the base's other settings there (`key.a: 1` changes one leaf)
    control = study.control or variants[0][0]
    ref = dict(_leaves(cfgs[control].model_dump(mode="json", exclude={"out"})))
    for name, sets in variants:
        got = dict(_leaves(cfgs[name].model_dump(mode="json", exclude={"out"})))
        said = [k for k, _ in _leaves(sets)]
        changed = [k for k in set(ref) | set(got) if ref.get(k) != got.get(k)]
        assert all(any(k == s or k.startswith(s + ".") for s in said) for k in changed), (name, sorted(changed))


@pytest.mark.parametrize("study_file", sorted((HERE.parents[1] / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_study_bases_keep_the_preset_values_they_do_not_name(study_file, tmp_path):
    # `key: {a: 1}` in a study's base replaces the preset's whole mapping at `key`: the tokenskip-knobs control
    # once lost the preset's lr 5e-4 that way and trained at the component default 5e-5 for an hour. A base must
    # resolve to the same config as its mappings spelled out leaf by leaf (`key.a: 1`), which keep the rest.
    study = ablate.load_study(study_file)
    leafwise = {}
    for k, v in study.base.set.items():
        if isinstance(v, dict) and v:
            leafwise.update({f"{k}.{leaf}": json.loads(val) for leaf, val in _leaves(v)})
        else:
            leafwise[k] = v
    spelled = study.model_copy(update={"base": study.base.model_copy(update={"set": leafwise})})
    name = study.control or ablate.expand(study)[0][0]
    sets = dict(ablate.expand(study))[name]
    as_written = ablate.variant_config(study, study_file, tmp_path, name, sets).model_dump(mode="json")
    leaf_by_leaf = ablate.variant_config(spelled, study_file, tmp_path, name, sets).model_dump(mode="json")
    dropped = [k for k, v in _leaves(leaf_by_leaf) if dict(_leaves(as_written)).get(k) != v]
    assert not dropped, f"{study_file.name}: the base's mappings drop preset values at {sorted(dropped)}"


def _leaves(d, prefix: str = ""):
    """(dotted key path, JSON value) for every leaf of a nested dict; lists are leaves."""
    if isinstance(d, dict) and d:
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, json.dumps(d, sort_keys=True)


def test_bad_study_files_name_the_key_path(tmp_path, doubles):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "axes": [{"key": "x", "values": []}]}))
    with pytest.raises(ConfigError, match=r"axes\.0\.values"):
        ablate.load_study(p)
    p.write_text(yaml.safe_dump({"name": "s", "combine": "zip", "axes": [{"key": "a", "values": [1]},
                                                                         {"key": "b", "values": [1, 2]}]}))
    with pytest.raises(ConfigError, match="equal length"):
        ablate.load_study(p)
    # a variant whose config is invalid fails before any variant runs, naming the variant and the key
    bad = _study(tmp_path, axes=[{"key": "components.salt-trainer.lr", "values": [1e-4, "fast"]}])
    with pytest.raises(ConfigError, match=r"(?s)variant 'lr=fast'.*components\.salt-trainer\.lr"):
        ablate.run_study(ablate.load_study(bad), bad, tmp_path / "out", echo=lambda *_: None)
    assert calls() == [] and not (tmp_path / "out" / "runs").exists()


def test_cli_set_overrides_the_base_of_every_variant_but_not_a_variants_own_key(tmp_path, doubles):
    p = _study(tmp_path, variants=[{"name": "own-limit", "set": {"test_data.limit": 3}}])
    study = ablate.with_overrides(ablate.load_study(p), ["threads=1", "test_data.limit=5"])
    assert ablate.load_study(p).base.set["test_data.limit"] == 6  # the file's study is untouched
    reg = ablate.study_registry(study.plugin_modules)
    cfgs = {n: ablate.variant_config(study, p, tmp_path / "out", n, sets, reg) for n, sets in ablate.expand(study)}
    assert sorted(cfgs) == ["lr=0.0001", "lr=0.001", "own-limit"]
    assert {n: (c.threads, c.test_data[0].limit) for n, c in cfgs.items()} == {
        "lr=0.0001": (1, 5), "lr=0.001": (1, 5), "own-limit": (1, 3)}
    with pytest.raises(ConfigError, match="key.path=value"):
        ablate.with_overrides(study, ["threads"])


def test_a_study_base_mapping_that_drops_preset_values_is_noted_once(tmp_path, doubles):
    study = ablate.load_study(_study(tmp_path))
    lines: list[str] = []
    ablate.dry_run(study, tmp_path / "s.yaml", tmp_path / "out", echo=lines.append)
    assert not [x for x in lines if x.startswith("note:")]  # leaf by leaf: nothing dropped
    base = study.base.model_copy(update={"set": {**{k: v for k, v in study.base.set.items()
                                                    if k != "components.rejection-sampler.n"},
                                                 "components.rejection-sampler": {"n": 2}}})
    lines.clear()
    ablate.dry_run(study.model_copy(update={"base": base}), tmp_path / "s.yaml", tmp_path / "out", echo=lines.append)
    notes = [x for x in lines if x.startswith("note:")]
    assert len(notes) == 1 and "components.rejection-sampler={...} replaces" in notes[0], lines


def test_a_study_shares_stages_reports_and_resumes(tmp_path, doubles):
    study_file = _study(tmp_path)
    study = ablate.load_study(study_file)
    out = tmp_path / "out"
    rows = ablate.dry_run(study, study_file, out, echo=lambda *_: None)
    # the sampler and selector are shared by both variants, each trainer is its own
    assert rows[0]["shared"]["1-sampler-rejection-sampler"] == ["lr=0.001"]
    assert rows[0]["shared"]["3-trainer-salt-trainer"] == [] and calls() == []

    s = ablate.run_study(study, study_file, out, echo=lambda *_: None)
    assert calls() == ["train lr=0.0001", "train lr=0.001"]
    assert s["stage_runs"] == {"total": 6, "from_cache": 2}  # variant 2 reused the sampler and the selector
    # each variant evaluates base and trained: the base model's evaluation is one, shared
    assert s["evaluations"] == {"total": 4, "distinct": 3, "unkeyed": 0}
    assert "4 evaluations, 3 distinct (1 shared through the evaluation cache)" in (out / "study.md").read_text()
    rows = {(r["variant"], r["test_set"]): r for r in s["rows"]}
    assert set(rows) == {("lr=0.0001", "arith"), ("lr=0.001", "arith")}
    r = rows[("lr=0.001", "arith")]
    assert r["model"] == "trained" and r["n"] == 6 and r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
    vb = r["vs_control"]
    assert vb["n"] == 6 and vb["lost"] + vb["gained"] <= 6 and "significant" in vb
    assert s["marginal_effects"][0]["axis"] == "components.salt-trainer.lr" and s["marginal_effects"][0]["pairs"] == 1
    md = (out / "study.md").read_text()
    assert "## arith" in md and "(control)" in md and "## Marginal effects" in md
    assert (out / "pareto.png").stat().st_size > 1000
    assert json.loads((out / "study.json").read_text())["rows"] == s["rows"]

    # rerun: nothing recomputed, same rows
    again = ablate.run_study(study, study_file, out, echo=lambda *_: None)
    assert calls() == ["train lr=0.0001", "train lr=0.001"] and again["ran"] == [] and again["rows"] == s["rows"]
    # a report written before evaluations carried their keys: the base model's key comes from the config
    rep_file = out / "runs" / "lr=0.0001" / "report.json"
    rep = json.loads(rep_file.read_text())
    for ts in rep["test_sets"]:
        for v in ts["variants"]:
            del v["eval_key"]
    rep_file.write_text(json.dumps(rep))
    old = ablate.run_study(study, study_file, out, echo=lambda *_: None)
    assert old["ran"] == [] and old["evaluations"] == {"total": 4, "distinct": 3, "unkeyed": 1}
    # a variant killed before it finished (no report): only it runs again, from the cache, same numbers
    (out / "runs" / "lr=0.001" / "report.json").unlink()
    resumed = ablate.run_study(study, study_file, out, echo=lambda *_: None)
    assert resumed["ran"] == ["lr=0.001"] and calls() == ["train lr=0.0001", "train lr=0.001"]
    assert resumed["rows"] == s["rows"]
    # a changed base config that no stage key holds (threads): every run directory is replaced, nothing recomputed
    said: list[str] = []
    rethreaded = ablate.run_study(ablate.with_overrides(study, ["threads=1"]), study_file, out, echo=said.append)
    assert rethreaded["ran"] == ["lr=0.0001", "lr=0.001"] and calls() == ["train lr=0.0001", "train lr=0.001"]
    assert sum("config changed" in line for line in said) == 2 and rethreaded["rows"] == s["rows"]
    assert "threads: 1" in (out / "runs" / "lr=0.001" / "config.yaml").read_text()


def test_only_runs_the_named_variants_and_the_control_and_a_later_part_completes_the_study(tmp_path, doubles):
    study_file = _study(tmp_path, variants=[{"name": "lr-big", "set": {"components.salt-trainer.lr": 1e-2}}])
    study, out = ablate.load_study(study_file), tmp_path / "out"
    with pytest.raises(ConfigError, match=r"no variant named 'nope' \(variants: lr=0.0001, lr=0.001, lr-big\)"):
        ablate.run_study(study, study_file, out, only=["nope"], echo=lambda *_: None)
    assert calls() == []  # refused before any work
    part = ablate.run_study(study, study_file, out, only=["lr-big"], echo=lambda *_: None)
    assert part["ran"] == ["lr=0.0001", "lr-big"] and part["not_run"] == ["lr=0.001"]  # the control comes along
    assert calls() == ["train lr=0.0001", "train lr=0.01"]
    assert {r["variant"] for r in part["rows"]} == {"lr=0.0001", "lr-big"}
    assert "Not run yet (`--only`), so not in the tables: `lr=0.001`." in (out / "study.md").read_text()
    rest = ablate.run_study(study, study_file, out, only=["lr=0.001"], echo=lambda *_: None)
    assert rest["ran"] == ["lr=0.001"] and rest["not_run"] == [] and calls()[2:] == ["train lr=0.001"]
    whole = ablate.run_study(study, study_file, tmp_path / "whole", echo=lambda *_: None)
    assert _without_dirs(rest["rows"]) == _without_dirs(whole["rows"])  # the parts summarize as the whole


def _without_dirs(rows):
    return [{k: v for k, v in r.items() if k != "run_dir"} for r in rows]


def test_parallel_workers_and_ray_share_the_cache_and_match_one_worker(tmp_path, doubles):
    """--workers 2 (spawned processes) and the Ray executor (a local Ray on 2 CPUs): both variants start at
    once and need the same sampler; it runs once, and the results equal a one-worker run's."""
    import ray

    study_file = _study(tmp_path)
    study = ablate.load_study(study_file)
    one = ablate.run_study(study, study_file, tmp_path / "one", echo=lambda *_: None)
    Path(os.environ["THINKPRESS_TEST_CALLS"]).unlink()
    two = ablate.run_study(study, study_file, tmp_path / "two", workers=2, echo=lambda *_: None)
    assert sorted(calls()) == ["train lr=0.0001", "train lr=0.001"]
    assert two["stage_runs"] == {"total": 6, "from_cache": 2}
    assert _without_dirs(two["rows"]) == _without_dirs(one["rows"])

    Path(os.environ["THINKPRESS_TEST_CALLS"]).unlink()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        viaray = ablate.run_study(study, study_file, tmp_path / "ray", executor="ray", echo=lambda *_: None)
    finally:
        ray.shutdown()
    assert sorted(calls()) == ["train lr=0.0001", "train lr=0.001"]
    assert viaray["stage_runs"] == {"total": 6, "from_cache": 2}
    assert _without_dirs(viaray["rows"]) == _without_dirs(one["rows"])


def _compute_once(cache_dir: str, key: str, out: str) -> None:
    store = RunStore(Path(cache_dir) / "run", Path(cache_dir))
    with store.lock(key):
        marker = Path(cache_dir) / key / "meta.json"
        if marker.exists():
            result = "reused"
        else:
            time.sleep(0.5)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("{}")
            result = "computed"
    with open(out, "a") as f:
        f.write(result + "\n")


def test_two_workers_reaching_one_stage_compute_it_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "log.txt"
    procs = [ctx.Process(target=_compute_once, args=(str(tmp_path), "k1", str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(log.read_text().split()) == ["computed", "reused"]


@pytest.mark.slow
def test_smoke_study_runs_end_to_end_and_a_killed_study_resumes_to_the_same_results(tmp_path, smollm_path):
    """studies/smoke-kv.yaml on SmolLM2 (hf, fp32, 1 thread): once straight through; once killed while its
    second variant runs, then rerun: it finishes, runs only what was unfinished, and gives the same rows."""
    import signal
    import subprocess
    import sys

    from conftest import cli_env, run_cli

    study = Path(__file__).resolve().parents[2] / "studies" / "smoke-kv.yaml"
    r = run_cli(["ablate", str(study), "--out", str(tmp_path / "straight"), "--quiet"], timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    straight = json.loads((tmp_path / "straight" / "study.json").read_text())
    models = {(row["variant"], row["model"]) for row in straight["rows"]}
    assert models == {(f"plugins={p}", f"base+{p}@budget={b}") for p in ("streaming", "h2o") for b in (16, 32)}
    assert all(0 < row["peak_kv_bytes"] for row in straight["rows"])
    # NLL and token agreement are over the full cache's answers that ended with EOS (absent or None when none did)
    assert all(0 < row["kv_ratio"] < 1 and "token_agreement" in row for row in straight["rows"])
    md = (tmp_path / "straight" / "study.md").read_text()
    assert "## arith" in md and "NLL full -> pruned" in md and "![accuracy and NLL vs. the KV cache kept](kv.png)" in md
    assert (tmp_path / "straight" / "kv.png").stat().st_size > 10_000

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "thinkpress.core.cli", "ablate", str(study), "--out", str(out),
                             "--quiet"], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while not (out / "runs" / "plugins=h2o" / "config.yaml").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "study.json").exists()
    r = run_cli(["ablate", str(study), "--out", str(out), "--quiet"], timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads((out / "study.json").read_text())
    assert resumed["ran"] == ["plugins=h2o"]
    assert _without_dirs(resumed["rows"]) == _without_dirs(straight["rows"])
