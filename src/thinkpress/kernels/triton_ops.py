"""Triton kernels and their launchers (Liger-Kernel style: private ``@triton.jit`` kernel + launcher).

Imported lazily by :mod:`thinkpress.kernels` the first time the Triton backend is used, so that tests
can set ``TRITON_INTERPRET=1`` first and run these kernels on CPU tensors through the interpreter.

Every kernel reads its input once per pass, accumulates in fp32 and keeps O(1) state per row:
- ``_token_scores_kernel``: one program per row; online max / sum-exp / shifted entropy sum (and the
  top-2 logits for the margin) over vocabulary blocks.
- ``_kl_kernel``: one program per row; the same online state for p and q plus sum p * (a - b).
- ``_wam_lse_kernel`` / ``_wam_colsum_kernel``: window attention mass in two passes (each query row's
  log-sum-exp over keys, then per block of keys the sum of probabilities over the group's queries);
  no [W, N] probability matrix is written.
- ``_last_similar_kernel``: for a block of rows, the most recent other key with cosine above a
  threshold (the O(N^2 * d) part of R-KV's redundancy), streaming over key blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from thinkpress.kernels.reference import TokenScores

NEG_INF = float("-inf")


@triton.jit
def _token_scores_kernel(logits_ptr, stride_row, targets_ptr, sur_ptr, ent_ptr, lse_ptr, mar_ptr, V, inv_temp,
                         HAS_TARGETS: tl.constexpr, HAS_MARGIN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)  # sum of e^(x - m) * (x - m)
    t1 = tl.full([], float("-inf"), tl.float32)
    t2 = tl.full([], float("-inf"), tl.float32)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        bmax = tl.max(x, 0)
        m_new = tl.maximum(m, bmax)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(x - m_safe)
        xs = tl.where(e > 0, x - m_safe, 0.0)
        shift = tl.where(s > 0, m - m_safe, 0.0)
        w = alpha * (w + shift * s) + tl.sum(e * xs, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
        if HAS_MARGIN:
            i1 = tl.argmax(x, 0)
            b2 = tl.max(tl.where(offs == i1, float("-inf"), x), 0)
            n2 = tl.maximum(tl.minimum(t1, bmax), tl.maximum(t2, b2))
            t1 = tl.maximum(t1, bmax)
            t2 = n2
    log_s = tl.log(s)
    lse = tl.where(s > 0, m + log_s, float("nan"))
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, log_s - w / s)
    if HAS_TARGETS:
        t = tl.load(targets_ptr + row)
        xt = tl.load(base + t).to(tl.float32) * inv_temp
        tl.store(sur_ptr + row, lse - xt)
    if HAS_MARGIN:
        tl.store(mar_ptr + row, tl.exp(t1 - lse) - tl.exp(t2 - lse))


@triton.jit
def _kl_kernel(p_ptr, q_ptr, stride_p, stride_q, out_ptr, V, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    pb = p_ptr + row.to(tl.int64) * stride_p
    qb = q_ptr + row.to(tl.int64) * stride_q
    mp = tl.full([], float("-inf"), tl.float32)
    mq = tl.full([], float("-inf"), tl.float32)
    sp = tl.zeros([], tl.float32)
    sq = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)  # sum of e^(a - mp) * (a - b)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        a = tl.load(pb + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        b = tl.load(qb + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        mp_new = tl.maximum(mp, tl.max(a, 0))
        mp_safe = tl.where(mp_new == float("-inf"), 0.0, mp_new)
        alpha_p = tl.exp(mp - mp_safe)
        ep = tl.exp(a - mp_safe)
        u = alpha_p * u + tl.sum(tl.where(ep > 0, ep * (a - b), 0.0), 0)
        sp = alpha_p * sp + tl.sum(ep, 0)
        mp = mp_new
        mq_new = tl.maximum(mq, tl.max(b, 0))
        mq_safe = tl.where(mq_new == float("-inf"), 0.0, mq_new)
        sq = tl.exp(mq - mq_safe) * sq + tl.sum(tl.exp(b - mq_safe), 0)
        mq = mq_new
    kl = u / sp - (mp - mq) - tl.log(sp) + tl.log(sq)
    tl.store(out_ptr + row, kl)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Rows may have any stride; the vocabulary dimension must be contiguous."""
    return x if x.stride(1) == 1 else x.contiguous()


def _block(v: int) -> int:
    return min(4096, triton.next_power_of_2(v))


def token_scores(logits, targets=None, *, temperature=1.0, margin=False) -> TokenScores:
    x = _rows(logits)
    n, v = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    sur = torch.empty(n, **f32) if targets is not None else None
    ent, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    mar = torch.empty(n, **f32) if margin else None
    tgt = targets.to(device=x.device, dtype=torch.int64).contiguous() if targets is not None else lse
    _token_scores_kernel[(n,)](x, x.stride(0), tgt, sur if sur is not None else lse, ent, lse,
                               mar if mar is not None else lse, v, 1.0 / temperature, HAS_TARGETS=targets is not None,
                               HAS_MARGIN=margin, BLOCK=_block(v))
    return TokenScores(sur, ent, lse, mar)


def kl_div(logits_p, logits_q, *, temperature=1.0) -> torch.Tensor:
    p, q = _rows(logits_p), _rows(logits_q)
    n, v = p.shape
    out = torch.empty(n, dtype=torch.float32, device=p.device)
    _kl_kernel[(n,)](p, q, p.stride(0), q.stride(0), out, v, 1.0 / temperature, BLOCK=_block(v))
    return out


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


@triton.jit
def _last_similar_kernel(k_ptr, last_ptr, val_ptr, N, D, threshold, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    d = tl.arange(0, BLOCK_D)
    base = k_ptr + bh.to(tl.int64) * N * D
    ki = tl.load(base + i[:, None] * D + d[None, :], mask=(i[:, None] < N) & (d[None, :] < D), other=0.0)
    best = tl.full([BLOCK_I], -1, tl.int32)
    best_val = tl.zeros([BLOCK_I], tl.float32)
    offs = tl.arange(0, BLOCK_J)
    for start in range(0, N, BLOCK_J):
        j = start + offs
        kj = tl.load(base + j[:, None] * D + d[None, :], mask=(j[:, None] < N) & (d[None, :] < D), other=0.0)
        cos = tl.sum(ki[:, None, :] * kj[None, :, :], 2)  # [BLOCK_I, BLOCK_J]
        similar = (cos > threshold) & (j[None, :] < N) & (j[None, :] != i[:, None])
        cand = tl.where(similar, j[None, :], -1)
        jmax = tl.max(cand, 1)
        vmax = tl.max(tl.where(j[None, :] == jmax[:, None], cos, float("-inf")), 1)
        found = jmax >= 0  # keys come in increasing order: a later find is more recent
        best = tl.where(found, jmax, best)
        best_val = tl.where(found, vmax, best_val)
    tl.store(last_ptr + bh * N + i, best, mask=i < N)
    tl.store(val_ptr + bh * N + i, best_val, mask=i < N)


def last_similar(keys, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = keys.shape
    kn = torch.nn.functional.normalize(keys.float(), dim=-1).contiguous()
    last = torch.empty(b, h, n, dtype=torch.int32, device=keys.device)
    val = torch.empty(b, h, n, dtype=torch.float32, device=keys.device)
    bi, bj = 16, 32
    _last_similar_kernel[(b * h, triton.cdiv(n, bi))](kn, last, val, n, d, threshold, BLOCK_I=bi, BLOCK_J=bj,
                                                       BLOCK_D=triton.next_power_of_2(d))
    return last.long(), val
