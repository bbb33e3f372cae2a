"""The ``kl_div`` kernel: one program per row; the online max / sum-exp state for p and q plus sum p * (a - b)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from thinkpress.kernels.triton._util import block, rows


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


def kl_div(logits_p, logits_q, *, temperature=1.0) -> torch.Tensor:
    p, q = rows(logits_p), rows(logits_q)
    n, v = p.shape
    out = torch.empty(n, dtype=torch.float32, device=p.device)
    _kl_kernel[(n,)](p, q, p.stride(0), q.stride(0), out, v, 1.0 / temperature, BLOCK=block(v))
    return out
