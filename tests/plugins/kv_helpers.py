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
