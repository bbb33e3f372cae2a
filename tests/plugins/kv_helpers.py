"""Test helpers for KV policies: record what a policy kept at every step, and the masked full-attention reference.

The reference for a pruned decode is one forward pass over prompt + generated tokens in which each
query sees exactly the keys the pruned cache held when that query ran (per layer, row and KV head):
prompt queries see the causal prompt; the query of generated token j sees the entries kept after
step j (the kept set ``S_j``) plus itself. Its logits must equal the pruned decode's.
"""

from __future__ import annotations

import math

import torch

MASKS: dict[int, torch.Tensor] = {}


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    visible = MASKS[module.layer_idx]  # [B, Hkv, Tq, Tk] bool
    b, hq, tq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    k = key.repeat_interleave(g, dim=1).float()
    v = value.repeat_interleave(g, dim=1).float()
    vis = visible.repeat_interleave(g, dim=1)
    scale = scaling if scaling is not None else 1 / math.sqrt(d)
    sc = torch.einsum("bhqd,bhkd->bhqk", query.float(), k) * scale
    sc = sc.masked_fill(~vis, float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(sc, dim=-1), v)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def register_masked_attention():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if "tp_test_masked" not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register("tp_test_masked", _masked_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register("tp_test_masked", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def record_kept(policy):
    """Wrap ``policy`` (a Press) so that ``policy.kept`` lists, after prefill and after every step, the
    kept positions per layer: ``kept[j][layer]`` is a [B, Hkv, N] tensor (-1 = filler)."""
    policy.kept = []
    begin, after = policy.begin, policy.after_step

    def _snap():
        policy.kept.append([p.clone() for p in policy.positions])

    def begin_rec(cache, mask, lengths):
        m = begin(cache, mask, lengths)
        _snap()
        return m

    def after_rec(cache, mask, step):
        m = after(cache, mask, step)
        _snap()
        return m

    policy.begin, policy.after_step = begin_rec, after_rec
    return policy


def reference_logits(model, prompt_ids: list[int], generated: list[int], kept, n_layers: int) -> torch.Tensor:
    """Logits [len(generated), V] of a full forward over prompt + generated with the recorded visibility (batch 1)."""
    L = len(prompt_ids)
    T = L + len(generated)
    ids = torch.tensor([prompt_ids + generated])
    for li in range(n_layers):
        hkv = kept[0][li].shape[1]
        vis = torch.zeros(1, hkv, T, T, dtype=torch.bool)
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
        vis[:, :, :L, :L] = causal
        for j in range(len(generated)):  # the query of generated token j sees S_j and itself
            t = L + j
            pos = kept[j][li][0]  # [Hkv, N]
            for h in range(hkv):
                p = pos[h][pos[h] >= 0]
                vis[0, h, t, p] = True
            vis[0, :, t, t] = True
        MASKS[li] = vis
    register_masked_attention()
    old = model.config._attn_implementation
    model.config._attn_implementation = "tp_test_masked"
    try:
        with torch.no_grad():
            logits = model(ids, position_ids=torch.arange(T)[None]).logits[0]
    finally:
        model.config._attn_implementation = old
        MASKS.clear()
    return logits[L - 1 : T - 1].float()  # logits that predict generated[0..]


# -- driving a policy by hand on a hand-built cache ----------------------------------------------------------------


def make_cache(keys: list[torch.Tensor]):
    """A transformers ``DynamicCache`` holding ``keys[layer]`` [B, Hkv, N, D] and, as values, the keys + 100."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for li, k in enumerate(keys):
        cache.update(k.clone(), k + 100.0, li)
    return cache


def attach_queries(policy, queries: list[torch.Tensor]) -> None:
    """Give a query-reading policy a recorder holding ``queries[layer]`` [B, Hq, W, D] (what capture would record)."""
    from thinkpress.plugins.kvprune.capture import QueryRecorder

    if policy.recorder is None:
        policy.recorder = QueryRecorder(policy.recorder_window())
    for li, q in enumerate(queries):
        policy.recorder.record(li, q)


def kept_sets(policy) -> list[list[list[list[int]]]]:
    """``kept[layer][row][head]``: the sorted logical positions a policy holds (fillers left out)."""
    return [[[sorted(p for p in pos[r, h].tolist() if p >= 0) for h in range(pos.shape[1])]
             for r in range(pos.shape[0])] for pos in policy.positions]


def check_physical(policy, cache, keys: list[torch.Tensor], mask: torch.Tensor, counts: list[int]) -> None:
    """The cache holds, slot for slot, the original keys (and values, keys + 100) of the positions the policy says it
    kept, and the returned mask marks exactly the real slots. ``keys[layer]`` [B, H, N, D] are the original keys,
    left-padded (row r's position p at column N - counts[r] + p)."""
    for li, pos in enumerate(policy.positions):
        layer = cache.layers[li]
        assert layer.keys.shape[2] == pos.shape[-1] == mask.shape[1]
        n = keys[li].shape[2]
        for r in range(pos.shape[0]):
            assert ((pos[r] >= 0) == mask[r].bool()[None, :]).all()
            for h in range(pos.shape[1]):
                for slot, p in enumerate(pos[r, h].tolist()):
                    if p >= 0:
                        orig = keys[li][r, h, n - counts[r] + p]
                        assert torch.equal(layer.keys[r, h, slot], orig)
                        assert torch.equal(layer.values[r, h, slot], orig + 100.0)


def prune_prefill(policy, keys: list[torch.Tensor], queries: list[torch.Tensor] | None = None,
                  counts: list[int] | None = None):
    """Run ``policy.begin`` on a prefill cache of ``keys[layer]`` [B, Hkv, N, D], left-padded to ``counts`` real
    entries per row (default: none padded), with ``queries[layer]`` [B, Hq, W, D] recorded for scorers that read
    them. Checks the physical eviction, then returns ``kept_sets(policy)``."""
    b, _, n, _ = keys[0].shape
    counts = counts or [n] * b
    mask = torch.zeros(b, n, dtype=torch.long)
    for r, c in enumerate(counts):
        mask[r, n - c:] = 1
    cache = make_cache(keys)
    if queries is not None:
        attach_queries(policy, queries)
    new_mask = policy.begin(cache, mask, counts)
    check_physical(policy, cache, keys, new_mask, counts)
    return kept_sets(policy)


def flip_score(policy) -> None:
    """Wrap ``policy.score_row`` to return its negation (what a sign bug in the scorer would do)."""
    score = policy.score_row
    policy.score_row = lambda *args, **kw: -score(*args, **kw)
