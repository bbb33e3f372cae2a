"""The ``key_redundancy`` kernel: for a block of keys, the most recent other key with cosine above a
threshold (the O(N^2 * d) part of R-KV's redundancy), streaming over key blocks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
