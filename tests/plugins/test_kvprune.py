"""KV pruning: physical eviction, exactness against a masked full forward, batches, bad input, the run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_env, run_cli
from kv_helpers import record_kept, reference_logits

from thinkpress.core.config import build_config
from thinkpress.core.engines.base import GenParams, KVPolicy
from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.errors import ConfigError, ModelError, PluginError
from thinkpress.core.evaluation import kv_agreement
from thinkpress.core.pipeline import resolve_plan
from thinkpress.core.plugins import build_registry
from thinkpress.plugins.kvprune.capture import QueryRecorder, capture_queries

SMALL = {  # small budgets so that 32 generated tokens evict many times
    "streaming": {"budgets": [24], "window": 4},
    "h2o": {"budgets": [24]},
    "snapkv": {"budgets": [24], "buffer": 4, "window": 8, "obs_window": 8},
    "rkv": {"budgets": [24], "buffer": 4},
    "rpc": {"period": 12, "obs_window": 4, "window": 4},
    "knorm": {"budgets": [24], "buffer": 4, "window": 4},
    "keydiff": {"budgets": [24], "buffer": 4, "window": 4, "per_head": False},
}
HUGE = {p: ({"period": 100_000} if p == "rpc" else {"budgets": [100_000]}) for p in SMALL}
QUESTIONS = ["What is 2+2?", "Tom has 3 apples and buys 5 more. How many apples does he have now? Explain.",
             "Name a color."]


@pytest.fixture(scope="module")
def reg():
    return build_registry(load_entry_points=False)


def policy(reg, name, cfg):
    e = reg.component("pruner", name)
    comp = e.cls(e.cls.Config(**cfg))
    return comp.make_policy(comp.variants()[0])


@pytest.fixture(scope="module")
def smol(smollm_path):
    return HFEngine.from_pretrained(smollm_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def tiny(request):
    return HFEngine.from_pretrained(request.getfixturevalue(request.param), dtype="float32", device="cpu")


def test_query_capture_records_post_rope_queries_without_changing_outputs(smol):
    ids = torch.tensor([smol._encode("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        ref = smol.model(ids).logits
        rec = QueryRecorder(window=4)
        with capture_queries(smol.model, rec):
            got = smol.model(ids).logits
    assert torch.equal(ref, got)
    cfg = smol.model.config
    assert len(rec.queries) == cfg.num_hidden_layers
    assert rec.queries[0].shape == (1, cfg.num_attention_heads, 4, cfg.hidden_size // cfg.num_attention_heads)
    assert smol.model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("name", list(SMALL))
def test_pruned_logits_equal_masked_full_forward(tiny, reg, name):
    prompt = tiny.chat_prompt(QUESTIONS[1])
    pol = record_kept(policy(reg, name, SMALL[name]))
    logits = []
    hook = tiny.model.register_forward_hook(lambda m, i, o: logits.append(o.logits[0, -1].float().clone()))
    try:
        tiny.stats.reset()
        out = tiny.generate([prompt], GenParams(max_new_tokens=32, ignore_eos=True), kv_policy=pol)[0][0]
    finally:
        hook.remove()
    assert tiny.stats.kv_evicted > 0  # the policy did evict
    assert pol.kept[-1][0].shape[-1] < len(tiny._encode(prompt)) + 32  # and the tensors shrank
    ref = reference_logits(tiny.model, tiny._encode(prompt), out.token_ids, pol.kept,
                           tiny.model.config.num_hidden_layers)
    got = torch.stack(logits[: len(out.token_ids)])
    assert (ref - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(SMALL))
def test_infinite_budget_reproduces_full_cache_output(smol, reg, name):
    prompts = [smol.chat_prompt(q) for q in QUESTIONS[:2]]
    params = GenParams(max_new_tokens=32)
    full = smol.generate(prompts, params, batch_size=2)
    smol.stats.reset()
    pruned = smol.generate(prompts, params, batch_size=2, kv_policy=policy(reg, name, HUGE[name]))
    assert [c[0].token_ids for c in pruned] == [c[0].token_ids for c in full]
    assert smol.stats.kv_evicted == 0


@pytest.mark.parametrize("name", list(SMALL))
def test_left_padded_batch_rows_equal_rows_decoded_alone(smol, reg, name):
    prompts = [smol.chat_prompt(q) for q in QUESTIONS]
    assert len({len(smol._encode(p)) for p in prompts}) == 3  # different lengths: left padding
    params = GenParams(max_new_tokens=32)
    smol.stats.reset()
    batch = smol.generate(prompts, params, batch_size=3, kv_policy=policy(reg, name, SMALL[name]))
    assert smol.stats.kv_evicted > 0
    alone = [smol.generate([p], params, kv_policy=policy(reg, name, SMALL[name]))[0][0] for p in prompts]
    assert [b[0].token_ids for b in batch] == [a.token_ids for a in alone]


def test_eviction_bounds_the_physical_cache(smol, reg):
    prompt = smol.chat_prompt(QUESTIONS[1])
    params = GenParams(max_new_tokens=96, ignore_eos=True)
    smol.stats.reset()
    smol.generate([prompt], params)
    full = smol.stats.peak_kv_bytes
    smol.stats.reset()
    smol.generate([prompt], params, kv_policy=policy(reg, "rkv", {"budgets": [32], "buffer": 8}))
    cfg = smol.model.config
    per_entry = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    # at most the prompt (prefill) or budget + buffer + the new token (decoding)
    assert smol.stats.peak_kv_bytes <= max(32 + 8 + 1, len(smol._encode(prompt))) * per_entry
    assert smol.stats.peak_kv_bytes < full / 2


def test_forced_decode_scores_given_tokens_under_a_policy(smol, reg):
    prompt = smol.chat_prompt(QUESTIONS[1])
    out = smol.generate([prompt], GenParams(max_new_tokens=24), logprobs=True)[0][0]
    full = smol.forced_decode([prompt], [out.token_ids])[0]
    assert full == pytest.approx(out.logprobs, abs=1e-4)  # the full cache reproduces generation's log-probs
    pruned = smol.forced_decode([prompt], [out.token_ids], kv_policy=policy(reg, "streaming", SMALL["streaming"]))[0]
    assert len(pruned) == len(full) and pruned != pytest.approx(full, abs=1e-4)


def test_models_that_cannot_be_pruned_are_refused_before_decoding(smol, reg):
    pol = policy(reg, "rkv", SMALL["rkv"])
    smol.model.config.layer_types = ["sliding_attention"] * smol.model.config.num_hidden_layers
    try:
        with pytest.raises(ModelError, match="sliding_attention"):
            smol.generate([smol.chat_prompt("hi")], GenParams(max_new_tokens=4), kv_policy=pol)
    finally:
        smol.model.config.layer_types = None
    type(smol.model)._supports_attention_backend = False
    try:
        with pytest.raises(ModelError, match="cannot be captured"):
            smol.generate([smol.chat_prompt("hi")], GenParams(max_new_tokens=4), kv_policy=pol)
        # a policy without queries still runs
        smol.generate([smol.chat_prompt("hi")], GenParams(max_new_tokens=4), kv_policy=policy(reg, "knorm", {}))
    finally:
        type(smol.model)._supports_attention_backend = True


@pytest.mark.parametrize("sets, match", [
    (["components.rkv.budgets=[8]"], r"components\.rkv.*budget 8 must be larger than window"),
    (["components.rkv.budgets=[10]", "components.rkv.sinks=12"], r"components\.rkv.*budget 10"),
    (["components.snapkv.obs_window=64"], r"components\.snapkv.*window \(32\) must hold"),
    (["components.rpc.ratios=[0]"], r"components\.rpc.*ratio 0"),
])
def test_bad_kv_configs_fail_before_any_work(reg, sets, match):
    cfg = build_config(preset="smoke", overrides={"plugins": ["kvprune"]}, sets=sets)
    with pytest.raises(ConfigError, match=match):
        resolve_plan(cfg, reg)


def test_plugin_names_bundle_and_unknown_policy(reg):
    plan = resolve_plan(build_config(preset="smoke", overrides={"plugins": ["kvprune"]}), reg)
    assert [p.name for p in plan.kv_pruners] == ["streaming", "h2o", "snapkv", "rkv", "rpc", "knorm", "keydiff"]
    assert not plan.train  # KV pruners alone: an evaluation run
    plan = resolve_plan(build_config(preset="smoke", overrides={"plugins": ["tokenskip", "rkv"]}), reg)
    assert plan.trainer.name == "tokenskip-sft" and [p.name for p in plan.kv_pruners] == ["rkv"]
    with pytest.raises(PluginError, match="available plugins: .*rkv"):
        resolve_plan(build_config(preset="smoke", overrides={"plugins": ["rkvv"]}), reg)
    with pytest.raises(ConfigError, match="unknown pruner 'nope'; available: .*snapkv"):
        resolve_plan(build_config(preset="smoke", overrides={"plugins": ["rkv"]}, sets=["stages.pruners=[nope]"]),
                     reg)


def test_kv_agreement_uses_eos_answers_and_the_common_prefix():
    full = [{"problem_id": "a", "finish_reason": "eos", "token_ids": [1, 2, 3, 4]},
            {"problem_id": "b", "finish_reason": "eos", "token_ids": [5, 6]},
            {"problem_id": "c", "finish_reason": "length", "token_ids": [7, 7, 7]}]
    pruned = [{"problem_id": "a", "token_ids": [1, 2, 9, 4]}, {"problem_id": "b", "token_ids": [5, 6]},
              {"problem_id": "c", "token_ids": [8]}]
    m = kv_agreement(full, pruned)
    assert m["n_agreement"] == 2 and m["token_agreement"] == pytest.approx((2 / 4 + 1) / 2)
    assert m["exact_match"] == pytest.approx(0.5)
    assert KVPolicy().select_rows(torch.tensor([0])) is None


@pytest.mark.slow
def test_kv_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--plugins", "rkv", "--preset", "smoke", "--out", str(out), "--quiet",
            "--set", "test_data.limit=6", "--set", "components.rkv.budgets=[24,4096]",
            "--set", "components.rkv.buffer=4", "--set", "eval.generation.max_new_tokens=48"]
    r = run_cli(args, env=cli_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    rows = {v["name"]: v for v in rep["variants"]}
    assert set(rows) == {"base", "base+rkv@budget=24", "base+rkv@budget=4096"}
    small, huge = rows["base+rkv@budget=24"], rows["base+rkv@budget=4096"]
    assert small["params"] == {"kv_policy": "rkv", "budget": 24}
    assert small["peak_kv_bytes"] < rows["base"]["peak_kv_bytes"] and small["kv_ratio"] < 1 and small["kv_evicted"] > 0
    assert huge["kv_evicted"] == 0 and huge["peak_kv_bytes"] == rows["base"]["peak_kv_bytes"]
    if huge["n_agreement"]:  # an infinite budget agrees with the full cache exactly
        assert huge["token_agreement"] == 1.0 and huge["nll_pruned"] == pytest.approx(huge["nll_full"], abs=1e-3)
    # paired against the full cache: the no-op budget changes no answer, and the counts explain the accuracy gap
    assert huge["flips_vs"] == "base" and (huge["n_paired"], huge["lost"], huge["gained"]) == (6, 0, 0)
    assert small["gained"] - small["lost"] == round(6 * (small["accuracy"] - rows["base"]["accuracy"]))
    md = (out / "report.md").read_text()
    assert "base+rkv@budget=4096" in md.split("No entry was evicted in")[1] and (out / "kv_rkv.png").exists()
