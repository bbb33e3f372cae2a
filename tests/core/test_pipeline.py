"""End-to-end runs on real models (SmolLM2-135M, tiny llama): resume after SIGKILL, caching, reports."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli_env
from safetensors.torch import load_file

CONTRACT = {"name", "params", "n", "accuracy", "mean_tokens", "mean_tokens_correct", "p50_tokens", "p90_tokens",
            "truncation_rate", "latency_s", "decode_tokens_per_s", "peak_kv_bytes"}


def _args(model, out, cache, *extra):
    return ["run", "--plugins", "shortest", "--preset", "smoke", "--model", model, "--out", str(out), "--quiet",
            "--set", f"cache_dir={cache}",
            "--set", "train_data.limit=16", "--set", "test_data.limit=4",
            "--set", "components.rejection-sampler.n=2", "--set", "components.rejection-sampler.max_new_tokens=40",
            # 4 sampling chunks of 8 (a kill lands between chunks); a step costs about as much at 8 as at 4
            "--set", "components.rejection-sampler.batch_size=8",
            "--set", "components.shortest.correct_only=false",
            "--set", "components.lora-sft.epochs=1", "--set", "components.lora-sft.batch_size=4",
            "--set", "components.lora-sft.max_length=160",
            "--set", "eval.generation.max_new_tokens=24", *extra]


def _cmd(args):
    return [sys.executable, "-m", "thinkpress.core.cli", *args]


def _samples(out):
    d = next((out / "stages").glob("1-sampler-*"))
    return [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_run_resumes_with_same_numbers_and_no_lost_or_duplicated_samples(
        tmp_path, smollm_path, example_plugin_site):
    env = cli_env(example_plugin_site)
    # uninterrupted reference run, with relative --out and cache_dir (paths must not depend on the cwd)
    ref = subprocess.run(_cmd(_args(smollm_path, "ref", "cache_ref", "--set", "threads=2")), env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr
    # the same run, killed with SIGKILL after its first finished sampling chunk
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.Popen(_cmd(_args(smollm_path, out, cache, "--set", "threads=2")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    journal = None
    while time.time() < deadline:
        journals = [j for j in cache.glob("*/journal.jsonl") if j.stat().st_size > 0]
        if journals:
            journal = journals[0]
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert journal is not None and not (journal.parent / "meta.json").exists(), "sampling was not interrupted"
    chunks_before = len(journal.read_text().splitlines())
    assert 1 <= chunks_before < 4
    res = subprocess.run(_cmd(_args(smollm_path, out, cache, "--set", "threads=2")), env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr

    # the same config run twice, each with its own cache (one of them killed and resumed): identical numbers,
    # samples and adapter weights; the thread count is fixed and recorded in the manifest
    a, b = _samples(tmp_path / "ref"), _samples(out)
    keys = [(s["problem_id"], s["index"]) for s in b]
    assert len(keys) == len(set(keys)) == 16 * 2
    assert a == b
    ra = json.loads((tmp_path / "ref" / "report.json").read_text())
    rb = json.loads((out / "report.json").read_text())
    strip = ("latency_s", "decode_tokens_per_s")
    assert [{k: v for k, v in x.items() if k not in strip} for x in ra["variants"]] == \
           [{k: v for k, v in x.items() if k not in strip} for x in rb["variants"]]
    sampler = next(v for k, v in rb["stages"].items() if k.startswith("1-sampler"))
    assert sampler["stats"]["resumed_chunks"] == chunks_before
    na, nb = _numbers(ra), _numbers(rb)
    for n in (na, nb):  # what the resume itself changes
        n["stages"] = {k: {**v, "stats": {s: x for s, x in v["stats"].items() if s != "resumed_chunks"}}
                       for k, v in n["stages"].items()}
    assert na == nb
    for d in ("ref", out):
        manifest = json.loads((tmp_path / d / "manifest.json").read_text())
        assert manifest["torch_threads"] == 2 and manifest["nondeterminism"] == []
    wa, wb = (load_file(next((tmp_path / c).glob("*/adapter/adapter_model.safetensors"))) for c in ("cache_ref", cache))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)

    # report contract
    assert {"config_hash", "plugins", "model", "dataset", "variants", "stages"} <= set(rb)
    assert [v["name"] for v in rb["variants"]] == ["base", "trained"]
    for v in rb["variants"]:
        assert CONTRACT <= set(v) and 0 <= v["accuracy"] <= 1 and 0 <= v["truncation_rate"] <= 1
        assert v["n"] == 4 and v["peak_kv_bytes"] > 0
    assert any(k.endswith("selector-shortest") for k in rb["stages"])  # the plugin's component ran
    assert (out / "report.md").read_text().startswith("# thinkpress run") and (out / "plot.png").stat().st_size
    assert (out / "config.yaml").exists() and json.loads((out / "manifest.json").read_text())["resumed"] is True

    # a second run sharing the cache reuses every training stage (ablation grids share upstream work)
    res = subprocess.run(_cmd(_args(smollm_path, tmp_path / "again", cache, "--set", "test_data.limit=2")),
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    rc = json.loads((tmp_path / "again" / "report.json").read_text())
    assert all(s["cached"] for s in rc["stages"].values())


TIMING_KEYS = {"latency_s", "decode_tokens_per_s", "wall_s", "s_per_step", "peak_rss_mb_process"}


def _numbers(report: dict) -> dict:
    """Everything a report says about results, without wall-clock timings."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING_KEYS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip({k: report[k] for k in ("config_hash", "variants", "test_sets", "summary", "stages")})
