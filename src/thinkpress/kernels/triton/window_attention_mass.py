"""The ``window_attention_mass`` kernels, two passes: each query row's log-sum-exp over the keys, then per
block of keys the sum of probabilities over the group's queries; no [W, N] probability matrix is written."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _wam_lse_kernel(q_ptr, k_ptr, lse_ptr, sqb, sqh, sqw, sqd, skb, skh, skn, skd, HQ, HKV, W, N, D, scale,
                    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)  # over B * HQ * W
    w = r % W
    hq = (r // W) % HQ
    b = r // (W * HQ)
    hkv = hq // (HQ // HKV)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * sqb + hq * sqh + w * sqw + d * sqd, mask=d < D, other=0.0).to(tl.float32)
    qpos = N - W + w
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        n = start + offs
        kmask = (n[:, None] < N) & (d[None, :] < D)
        k = tl.load(k_ptr + b * skb + hkv * skh + n[:, None] * skn + d[None, :] * skd, mask=kmask, other=0.0)
        sc = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale
        valid = n < N
        if CAUSAL:
            valid = valid & (n <= qpos)
        sc = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = tl.exp(m - m_safe) * s + tl.sum(tl.exp(sc - m_safe), 0)
        m = m_new
    tl.store(lse_ptr + r, m + tl.log(s))


@triton.jit
def _wam_colsum_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, sqb, sqh, sqw, sqd, skb, skh, skn, skd, HQ, HKV, W, N, D,
                       scale, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)  # over B * HKV
    b = bh // HKV
    hkv = bh % HKV
    G = HQ // HKV
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    kmask = (n[:, None] < N) & (d[None, :] < D)
    k = tl.load(k_ptr + b * skb + hkv * skh + n[:, None] * skn + d[None, :] * skd, mask=kmask, other=0.0)
    k = k.to(tl.float32)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r in range(0, G * W):
        hq = hkv * G + r // W
        w = r % W
        q = tl.load(q_ptr + b * sqb + hq * sqh + w * sqw + d * sqd, mask=d < D, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + (b * HQ + hq) * W + w)
        sc = tl.sum(k * q[None, :], 1) * scale
        valid = n < N
        if CAUSAL:
            valid = valid & (n <= N - W + w)
        acc += tl.where(valid, tl.exp(sc - lse), 0.0)
    tl.store(out_ptr + bh * N + n, acc / (G * W), mask=n < N)


def window_attention_mass(queries, keys, *, causal=True, scale=None) -> torch.Tensor:
    b, hq, w, d = queries.shape
    hkv, n = keys.shape[1], keys.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lse = torch.empty(b * hq * w, dtype=torch.float32, device=keys.device)
    out = torch.empty(b, hkv, n, dtype=torch.float32, device=keys.device)
    bd = triton.next_power_of_2(d)
    bn = max(16, min(128, triton.next_power_of_2(n)))
    qs, ks = queries.stride(), keys.stride()
    _wam_lse_kernel[(b * hq * w,)](queries, keys, lse, *qs, *ks, hq, hkv, w, n, d, scale, CAUSAL=causal,
                                   BLOCK_N=bn, BLOCK_D=bd)
    _wam_colsum_kernel[(b * hkv, triton.cdiv(n, bn))](queries, keys, lse, out, *qs, *ks, hq, hkv, w, n, d, scale,
                                                      CAUSAL=causal, BLOCK_N=bn, BLOCK_D=bd)
    return out
