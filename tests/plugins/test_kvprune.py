"""KV pruning: which entries each policy keeps, physical eviction, exactness against a masked full forward, peak KV,
batches, bad input, the run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cli_env, run_cli
from kv_helpers import (
    attach_queries,
    check_physical,
    flip_score,
    kept_sets,
    make_cache,
    prune_prefill,
    record_kept,
    reference_logits,
)

from thinkpress.core.config import build_config
from thinkpress.core.engines.base import GenParams, KVPolicy
from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.errors import ConfigError, ModelError, PluginError
from thinkpress.core.evaluation import kv_agreement
from thinkpress.core.planning import resolve_plan
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


def test_speed_ratios_only_between_variants_timed_at_one_thread_count(tmp_path):
    from thinkpress.core.planning import TestSet
    from thinkpress.core.results import TestSetResult, VariantResult
    from thinkpress.core.stages import EvalVariant
    from thinkpress.plugins.kvprune.report import budget_report

    def row(name, tps, threads):
        return {"name": name, "accuracy": 0.5, "mean_tokens": 10.0, "peak_kv_bytes": 2**20, "decode_tokens_per_s": tps,
                "threads": threads, "kv_evicted": 1}

    variants = [VariantResult(EvalVariant("base"), row("base", 10.0, 2))]
    for budget, (name, threads) in enumerate([("same", 2), ("other", 1), ("mixed", None)]):
        variants.append(VariantResult(EvalVariant(name, kv_pruner="rkv", kv_params={"budget": 8 * (budget + 1)},
                                                  reference="base"), row(name, 15.0, threads)))
    result = TestSetResult(TestSet("t", None, [], "k"), variants)
    md = "\n".join(budget_report("rkv", result, tmp_path))
    rows = {v.name: v.row for v in variants}
    assert rows["same"]["speed_ratio"] == pytest.approx(1.5) and "1.50x" in md
    assert "speed_ratio" not in rows["other"] and "speed_ratio" not in rows["mixed"]
    assert "No speed ratio for other, mixed" in md


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
    assert small["threads"] == rows["base"]["threads"] >= 1 and small["speed_ratio"] > 0  # timed alike
    if huge["n_agreement"]:  # an infinite budget agrees with the full cache exactly
        assert huge["token_agreement"] == 1.0 and huge["nll_pruned"] == pytest.approx(huge["nll_full"], abs=1e-3)
    # paired against the full cache: the no-op budget changes no answer, and the counts explain the accuracy gap
    assert huge["flips_vs"] == "base" and (huge["n_paired"], huge["lost"], huge["gained"]) == (6, 0, 0)
    assert small["gained"] - small["lost"] == round(6 * (small["accuracy"] - rows["base"]["accuracy"]))
    md = (out / "report.md").read_text()
    assert "base+rkv@budget=4096" in md.split("No entry was evicted in")[1] and (out / "kv_rkv.png").exists()


# -- which entries each policy keeps, on hand-built caches -------------------------------------------------------
#
# Each case is built so that the right kept set is known by construction (and, for the attention scorers, also by a
# brute-force reading of the method in plain Python loops). ``flip`` negates the policy's score: every case must then
# keep a different set, so these tests catch a sign error in any scorer.

FLIP = pytest.mark.parametrize("flip", [False, True], ids=["policy", "sign_flipped"])


def _expect(kept, expected, flip):
    if flip:
        assert kept != expected, "a sign-flipped score kept the same entries: the case cannot tell the sign"
    else:
        assert kept == expected


def _unit(d, i, scale=1.0):
    v = torch.zeros(d)
    v[i] = scale
    return v


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def _bf_window_mass(q, k, row, head):
    """Mean softmax attention each key of KV head ``head`` gets from the window queries of its query-head group:
    q [B, Hq, W, D], k [B, Hkv, N, D]; query w sits at position N - W + w and sees keys 0..itself."""
    hq, w = q.shape[1], q.shape[2]
    hkv, n, d = k.shape[1], k.shape[2], k.shape[3]
    g = hq // hkv
    keys = k[row, head].tolist()
    out = [0.0] * n
    for qh in range(head * g, (head + 1) * g):
        for wi in range(w):
            qv = q[row, qh, wi].tolist()
            at = n - w + wi
            for j, a in enumerate(_softmax([_dot(qv, keys[j]) / math.sqrt(d) for j in range(at + 1)])):
                out[j] += a / (g * w)
    return out


def _bf_pool(xs, kernel, mode):
    half = kernel // 2
    win = [xs[max(0, j - half): j + half + 1] for j in range(len(xs))]
    return [max(v) for v in win] if mode == "max" else [sum(v) / len(v) for v in win]


def _top(scores, candidates, k):
    """The k candidate positions with the highest scores (the case must have no tie at the cut)."""
    ranked = sorted(candidates, key=lambda j: -scores[j])
    assert scores[ranked[k - 1]] > scores[ranked[k]] + 1e-6, "tie at the cut: the case is ambiguous"
    return sorted(ranked[:k])


@FLIP
def test_streaming_keeps_the_sinks_and_the_most_recent_entries(reg, flip):
    pol = policy(reg, "streaming", {"budgets": [6], "sinks": 2, "window": 1, "buffer": 0})
    if flip:
        flip_score(pol)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 12, 4, generator=g)
    kept = prune_prefill(pol, [keys], counts=[12, 9])  # row 1: 3 padding slots
    # 2 sinks + the budget - sinks = 4 most recent, per row (row 1 holds positions 0..8)
    _expect(kept, [[[[0, 1, 8, 9, 10, 11]] * 2, [[0, 1, 5, 6, 7, 8]] * 2]], flip)


LOW_NORM = {(0, 0): [3, 5, 7], (0, 1): [1, 2, 9], (1, 0): [4, 6, 8], (1, 1): [2, 3, 4]}  # (layer, head): positions


@FLIP
def test_knorm_keeps_the_low_norm_keys_per_layer_and_head(reg, flip):
    pol = policy(reg, "knorm", {"budgets": [6], "sinks": 1, "window": 2, "buffer": 0})
    if flip:
        flip_score(pol)
    g = torch.Generator().manual_seed(1)
    keys = []
    for li in range(2):
        k = torch.nn.functional.normalize(torch.randn(1, 2, 12, 8, generator=g), dim=-1)
        norms = torch.full((2, 12), 5.0) + 0.1 * torch.arange(12)  # the sinks and the window: large norms
        for h in range(2):
            norms[h, LOW_NORM[li, h]] = torch.tensor([0.5, 0.6, 0.7])
        keys.append(k * norms[None, :, :, None])
    kept = prune_prefill(pol, keys)
    # sink 0, window 10-11, and the 3 lowest-norm keys of 1..9 (budget 6), chosen per layer and KV head
    _expect(kept, [[[sorted([0, 10, 11] + LOW_NORM[li, h]) for h in range(2)]] for li in range(2)], flip)


DISTINCT = {(0, 0): [2, 5, 8], (0, 1): [1, 4, 9], (1, 0): [1, 3, 5], (1, 1): [2, 3, 4]}  # (row, head): positions


@FLIP
def test_keydiff_keeps_the_keys_unlike_the_mean_key_of_the_real_entries(reg, flip):
    pol = policy(reg, "keydiff", {"budgets": [6], "sinks": 1, "window": 2, "buffer": 0})
    if flip:
        flip_score(pol)
    g = torch.Generator().manual_seed(2)
    keys = torch.zeros(2, 2, 12, 8)
    counts = [12, 8]
    for r, c in enumerate(counts):
        for h in range(2):
            for p in range(c):  # most keys point along e0 (slightly perturbed); 3 point along e1, e2, e3
                col = 12 - c + p
                keys[r, h, col] = _unit(8, 0) + 0.01 * torch.randn(8, generator=g)
            for i, p in enumerate(DISTINCT[r, h]):
                keys[r, h, 12 - c + p] = _unit(8, 1 + i)
    keys[1, :, :4] = _unit(8, 0, -10.0)  # row 1's padding: in the mean, it would flip it and keep the e0 keys
    kept = prune_prefill(pol, [keys], counts=counts)
    expected = [[sorted([0, c - 2, c - 1] + DISTINCT[r, h]) for h in range(2)] for r, c in enumerate(counts)]
    # the same by brute force: -cos(k, mean of the row's real keys), top 3 of the unprotected positions
    for r, c in enumerate(counts):
        for h in range(2):
            ks = [keys[r, h, 12 - c + p].tolist() for p in range(c)]
            mean = [sum(col) / c for col in zip(*ks, strict=True)]
            score = [-_dot(k, mean) / math.sqrt(_dot(k, k) * _dot(mean, mean)) for k in ks]
            assert sorted([0, c - 2, c - 1] + _top(score, range(1, c - 2), 3)) == expected[r][h]
    _expect(kept, [expected], flip)


@FLIP
def test_snapkv_keeps_the_most_attended_key_and_its_pooled_neighbours(reg, flip):
    pol = policy(reg, "snapkv", {"budgets": [6], "sinks": 1, "window": 2, "obs_window": 2, "buffer": 0,
                                 "kernel": 3, "pooling": "avg"})
    if flip:
        flip_score(pol)
    g = torch.Generator().manual_seed(3)
    hot = [5, 9]  # per KV head: the key every window query of the head's group attends to
    keys = 0.1 * torch.randn(1, 2, 14, 8, generator=g)
    for h, p in enumerate(hot):
        keys[0, h, p] = _unit(8, 0, 4.0)
    queries = _unit(8, 0, 4.0) + 0.1 * torch.randn(1, 4, 2, 8, generator=g)  # 4 query heads (GQA, groups of 2)
    kept = prune_prefill(pol, [keys], [queries])
    # pooling (kernel 3) spreads the hot key's score to its two neighbours: sink 0, window 12-13, hot +- 1
    expected = [[sorted([0, 12, 13, p - 1, p, p + 1]) for p in hot]]
    for h in range(2):  # the same by brute force
        score = _bf_pool(_bf_window_mass(queries, keys, 0, h), 3, "avg")
        assert sorted([0, 12, 13] + _top(score, range(1, 12), 3)) == expected[0][h]
    _expect(kept, [expected], flip)


COPIES = {0: [2, 5, 8], 1: [1, 3, 9]}  # per KV head: positions holding the same key


@FLIP
def test_rkv_drops_the_older_copies_of_a_repeated_key(reg, flip):
    # Zero queries: every candidate gets the same importance, so redundancy decides. Head h holds one key at the
    # three COPIES[h] positions and distinct orthogonal keys elsewhere. With the exemption (each key's most recent
    # similar copy, cos > 0.5, is not counted) the oldest copy is redundant twice, the middle one once and the most
    # recent one not at all: a budget that drops two candidates drops the two older copies.
    pol = policy(reg, "rkv", {"budgets": [10], "sinks": 1, "window": 2, "obs_window": 2, "buffer": 0})
    if flip:
        flip_score(pol)
    g = torch.Generator().manual_seed(4)
    keys = torch.zeros(1, 2, 12, 8)
    for h in range(2):
        others = iter(range(1, 8))
        for p in range(10):
            keys[0, h, p] = _unit(8, 0, 3.0) if p in COPIES[h] else _unit(8, next(others), 1.0 + p / 10)
        keys[0, h, 10:] = torch.randn(2, 8, generator=g)
    queries = torch.zeros(1, 4, 2, 8)
    kept = prune_prefill(pol, [keys], [queries])
    expected = [[[p for p in range(12) if p not in COPIES[h][:2]] for h in range(2)]]
    _expect(kept, [expected], flip)


def _bf_redundancy(keys, row, head, threshold):
    """R-KV's redundancy of one head before the softmax, by its definition: S = cosine similarity, diagonal 0; with
    a threshold, each row i zeroes S[i, j*] for its most recent (largest j != i) key with cos > threshold; then
    R_j = sum_i S[i, j] / N. Also returns how many rows exempted a key."""
    ks = keys[row, head].tolist()
    n = len(ks)
    unit = [[x / math.sqrt(_dot(k, k)) for x in k] for k in ks]
    s = [[_dot(unit[i], unit[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    exempted = 0
    if threshold is not None:
        for i in range(n):
            similar = [j for j in range(n) if j != i and s[i][j] > threshold]
            if similar:
                s[i][max(similar)] = 0.0
                exempted += 1
    return [sum(s[i][j] for i in range(n)) / n for j in range(n)], exempted


def test_rkv_redundancy_and_score_equal_a_brute_force_reading_of_the_method(reg):
    from thinkpress.kernels import key_redundancy

    g = torch.Generator().manual_seed(5)
    b, h, n, d = 2, 3, 20, 6
    keys = torch.randn(b, h, n, d, generator=g)
    keys[:, :, 12] = keys[:, :, 3] + 0.05 * torch.randn(b, h, d, generator=g)  # near-copies, some rescaled
    keys[:, :, 17] = 2.5 * keys[:, :, 12]
    keys[:, 1, 9] = -keys[:, 1, 4]
    for thr in (0.5, None):
        got = key_redundancy(keys, exemption_threshold=thr)
        total = 0
        for r in range(b):
            for hh in range(h):
                want, ex = _bf_redundancy(keys, r, hh, thr)
                total += ex
                torch.testing.assert_close(got[r, hh], torch.tensor(want), atol=1e-5, rtol=1e-5)
        assert (total > 0) == (thr is not None)  # the exemption was exercised

    # the whole score of a row: lam * A - (1 - lam) * softmax(R) over the candidates (all but the window)
    cfg = {"budgets": [16], "sinks": 1, "window": 4, "obs_window": 4, "kernel": 7, "lam": 0.3, "threshold": 0.5}
    pol = policy(reg, "rkv", cfg)
    queries = 2.0 * torch.randn(b, 2 * h, 4, d, generator=g)
    cand = n - 4
    for r in range(b):
        got = pol.score_row(0, keys[r:r + 1], keys[r:r + 1], queries[r:r + 1], torch.arange(n)[None, None], r)
        for hh in range(h):
            imp = _bf_pool(_bf_window_mass(queries, keys, r, hh), 7, "max")
            red = _softmax(_bf_redundancy(keys[:, :, :cand], r, hh, 0.5)[0])
            want = [0.3 * imp[j] - (0.7 * red[j] if j < cand else 0.0) for j in range(n)]
            torch.testing.assert_close(got[0, hh], torch.tensor(want), atol=1e-5, rtol=1e-5)


HEAVY = {0: [1, 3, 5], 1: [2, 4, 6]}  # per KV head: keys every prompt query attends to


@FLIP
def test_h2o_keeps_the_keys_with_the_most_accumulated_attention(reg, flip):
    pol = policy(reg, "h2o", {"budgets": [6]})  # recent_ratio 0.5: 3 recent + 3 heavy hitters
    if flip:
        flip_score(pol)
    g = torch.Generator().manual_seed(6)
    keys = torch.randn(1, 2, 12, 8, generator=g)
    keys[..., 0] = 0.0  # logit 0 against the queries below ...
    for h, ps in HEAVY.items():
        keys[0, h, ps] = _unit(8, 0, 8.0)  # ... and logit 8 for the heavy hitters
    queries = _unit(8, 0, math.sqrt(8)).expand(1, 4, 12, 8).clone()  # every prompt query (H2O reads them all)
    kept = prune_prefill(pol, [keys], [queries])
    expected = [[sorted(HEAVY[h] + [9, 10, 11]) for h in range(2)]]
    for h in range(2):  # by brute force: attention summed over every (causal) prompt query
        acc = [0.0] * 12
        for i in range(12):
            qv = queries[0, 2 * h, i].tolist()
            for j, a in enumerate(_softmax([_dot(qv, keys[0, h, j].tolist()) / math.sqrt(8) for j in range(i + 1)])):
                acc[j] += a
        assert sorted(_top(acc, range(9), 3) + [9, 10, 11]) == expected[0][h]
    _expect(kept, [expected], flip)


def _bf_h2o(keys, queries, prompt, budget, recent):
    """H2O by its definition, one KV head (one query head): accumulate every query's attention over the kept keys,
    keep the ``recent`` most recent and the top ``budget - recent`` by accumulated attention. Kept sets per step."""
    d = len(keys[0])
    acc, kept, out = {}, [], []
    for t in range(len(keys)):
        kept.append(t)
        acc[t] = 0.0
        logits = [_dot(queries[t], keys[j]) / math.sqrt(d) for j in kept]
        for j, a in zip(kept, _softmax(logits), strict=True):
            acc[j] += a
        if t + 1 < prompt:
            continue
        if len(kept) > budget:
            rec = [j for j in kept if j >= t + 1 - recent]
            heavy = sorted((j for j in kept if j < t + 1 - recent), key=lambda j: -acc[j])[: budget - len(rec)]
            kept = sorted(heavy + rec)
        out.append(list(kept))
    return out


@FLIP
def test_h2o_accumulates_attention_across_decode_steps_like_a_brute_force_simulation(reg, flip):
    pol = policy(reg, "h2o", {"budgets": [6]})
    if flip:
        flip_score(pol)
    g = torch.Generator().manual_seed(7)
    prompt, steps, h = 10, 8, 2
    keys = 1.5 * torch.randn(1, h, prompt + steps, 8, generator=g)
    queries = 1.5 * torch.randn(1, h, prompt + steps, 8, generator=g)  # one query head per KV head
    cache = make_cache([keys[:, :, :prompt]])
    attach_queries(pol, [queries[:, :, :prompt]])
    mask = pol.begin(cache, torch.ones(1, prompt, dtype=torch.long), [prompt])
    got = [kept_sets(pol)[0][0]]
    for t in range(prompt, prompt + steps):
        cache.update(keys[:, :, t:t + 1], keys[:, :, t:t + 1] + 100.0, 0)
        attach_queries(pol, [queries[:, :, t:t + 1]])
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        mask = pol.after_step(cache, mask, t - prompt + 1)
        got.append(kept_sets(pol)[0][0])
        check_physical(pol, cache, [keys[:, :, : t + 1]], mask, [t + 1])
    sims = [_bf_h2o(keys[0, hh].tolist(), queries[0, hh].tolist(), prompt, 6, 3) for hh in range(h)]
    expected = [[sims[hh][s] for hh in range(h)] for s in range(steps + 1)]
    assert all(len(k) == 6 for step in expected for k in step)
    _expect(got, expected, flip)


@FLIP
def test_rpc_compresses_each_period_by_the_head_averaged_window_attention(reg, flip):
    # prompt 3 (protected), period 8, ratio 2: after 8 generated tokens keep prompt + 8/2 + obs_window = 9 entries.
    # Candidates are positions 3..8 (9 and 10 are the window). One set per layer: scores averaged over heads.
    pol = policy(reg, "rpc", {"period": 8, "ratios": [2], "obs_window": 2, "window": 2, "sinks": 0, "kernel": 1})
    if flip:
        flip_score(pol)
    logit = {0: {3: -9.0, 4: 2.0, 5: 2.0, 6: 0.0, 7: 2.0, 8: 2.0},  # head 0 alone would drop 3 and 6
             1: {3: 2.5, 4: 2.0, 5: 2.0, 6: 0.5, 7: -9.0, 8: 2.0}}  # head 1 alone 7 and 6; averaged: 6 and 7
    g = torch.Generator().manual_seed(8)
    n, prompt = 11, 3
    keys = torch.zeros(1, 2, n, 8)
    keys[..., 1:] = torch.randn(1, 2, n, 7, generator=g)  # e0 carries the logit (query = sqrt(8) e0)
    for h in range(2):
        for p, s in logit[h].items():
            keys[0, h, p, 0] = s
    queries = _unit(8, 0, math.sqrt(8)).expand(1, 4, n, 8).clone()
    cache = make_cache([keys[:, :, :prompt]])
    attach_queries(pol, [queries[:, :, :prompt]])
    mask = pol.begin(cache, torch.ones(1, prompt, dtype=torch.long), [prompt])
    for t in range(prompt, n):
        cache.update(keys[:, :, t:t + 1], keys[:, :, t:t + 1] + 100.0, 0)
        attach_queries(pol, [queries[:, :, t:t + 1]])
        mask = pol.after_step(cache, torch.cat([mask, mask.new_ones(1, 1)], dim=1), t - prompt + 1)
        if t < n - 1:
            assert cache.layers[0].keys.shape[2] == t + 1  # nothing before the period ends
    check_physical(pol, cache, [keys], mask, [n])
    expected = [[[0, 1, 2, 3, 4, 5, 8, 9, 10]] * 2]
    mass = [_bf_window_mass(queries[:, :, -2:], keys, 0, h) for h in range(2)]  # brute force: the head average
    avg = [(mass[0][j] + mass[1][j]) / 2 for j in range(n)]
    assert sorted([0, 1, 2, 9, 10] + _top(avg, range(3, 9), 4)) == expected[0][0]
    assert sorted([0, 1, 2, 9, 10] + _top(mass[0], range(3, 9), 4)) != expected[0][0]  # per head would differ
    _expect(kept_sets(pol), [expected], flip)


def test_kv_kept_counts_each_answers_entries_against_its_own_full_cache(tiny_llama, reg):
    engine = HFEngine.from_pretrained(tiny_llama, dtype="float32", device="cpu")
    prompts = [engine.chat_prompt(q) for q in QUESTIONS[:2]]
    plen = [len(engine._encode(p)) for p in prompts]
    assert min(plen) > 9 and plen[0] != plen[1]  # the shorter row is left-padded in the batch
    params = GenParams(max_new_tokens=6, ignore_eos=True)
    for o in engine.generate(prompts, params, batch_size=2):
        assert (o[0].kv_kept_peak, o[0].kv_kept_mean) == (1.0, 1.0)
    # streaming at budget 8, no buffer: the prompt is cut to 8 in begin, each step holds 9 before it prunes to 8;
    # 6 tokens by length, so 5 were fed back and the full cache would end at prompt + 5 (the prefill's whole
    # prompt is in peak_kv_bytes, not in the entries a policy keeps while decoding)
    pol = policy(reg, "streaming", {"budgets": [8], "window": 1, "buffer": 0})
    outs = engine.generate(prompts, params, batch_size=2, kv_policy=pol)
    for p, o in zip(plen, outs, strict=True):
        assert o[0].finish_reason == "length" and o[0].n_tokens == 6
        assert o[0].kv_kept_peak == pytest.approx(9 / (p + 5))
        assert o[0].kv_kept_mean == pytest.approx((8 + 5 * 9) / (p + sum(p + t for t in range(1, 6))))


def test_peak_kv_includes_the_prefill_cache_a_policy_prunes_at_begin(tiny_llama, reg):
    engine = HFEngine.from_pretrained(tiny_llama, dtype="float32", device="cpu")
    prompts = [engine.chat_prompt(q) for q in QUESTIONS[:2]]
    longest = max(len(engine._encode(p)) for p in prompts)
    assert longest > 2 * 8  # streaming at budget 8 evicts most of the prompt in begin
    cfg = engine.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    prefill = cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * longest * head_dim * 4  # batch 2, fp32
    engine.stats.reset()
    pol = policy(reg, "streaming", {"budgets": [8], "window": 1})
    engine.generate(prompts, GenParams(max_new_tokens=6, ignore_eos=True), batch_size=2, kv_policy=pol)
    assert engine.stats.kv_evicted > 0
    assert engine.stats.peak_kv_bytes == prefill  # not the 8-entry cache the policy leaves
