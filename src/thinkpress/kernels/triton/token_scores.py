"""The ``token_scores`` kernel: one program per row; online max / sum-exp / shifted entropy sum (and the
top-2 logits for the margin) over vocabulary blocks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from thinkpress.kernels.ops.token_scores import TokenScores
from thinkpress.kernels.triton._util import block, rows


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


def token_scores(logits, targets=None, *, temperature=1.0, margin=False) -> TokenScores:
    x = rows(logits)
    n, v = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    sur = torch.empty(n, **f32) if targets is not None else None
    ent, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    mar = torch.empty(n, **f32) if margin else None
    tgt = targets.to(device=x.device, dtype=torch.int64).contiguous() if targets is not None else lse
    _token_scores_kernel[(n,)](x, x.stride(0), tgt, sur if sur is not None else lse, ent, lse,
                               mar if mar is not None else lse, v, 1.0 / temperature, HAS_TARGETS=targets is not None,
                               HAS_MARGIN=margin, BLOCK=block(v))
    return TokenScores(sur, ent, lse, mar)
