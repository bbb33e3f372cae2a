"""``window_attention_mass``: the mean attention each cached key receives from a window of queries.

GQA-aware, causal, optional 1-D pooling (SnapKV, R-KV, RPC, H2O). The reference builds the [W, N]
scores in chunks of keys, in two passes; the Triton kernels
(:mod:`thinkpress.kernels.triton.window_attention_mass`) write no [W, N] matrix at all.
"""

from __future__ import annotations

import math

import torch

from thinkpress.kernels.ops._common import triton_impl, use_triton


def check_qk(queries: torch.Tensor, keys: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"queries must be [B, Hq, W, D] and keys [B, Hkv, N, D]; got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    if not queries.is_floating_point() or not keys.is_floating_point():
        raise TypeError("queries and keys must be floating point")
    b, hq, w, d = queries.shape
    b2, hkv, n, d2 = keys.shape
    if b != b2 or d != d2:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)}: batch or head_dim differ")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if w == 0 or n == 0 or d == 0 or b == 0:
        raise ValueError("queries and keys must not be empty")
    return b, hq, hkv, w, n, d


def pool1d(scores: torch.Tensor, kernel: int, mode: str = "max") -> torch.Tensor:
    """Same-length 1-D pooling over the last dimension (odd kernel; 1 = no pooling)."""
    if kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {kernel}")
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    if mode == "max":
        y = torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif mode == "avg":
        y = torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    else:
        raise ValueError(f"pooling mode must be 'max' or 'avg', got {mode!r}")
    return y.reshape(shape)


def window_attention_mass_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    pool_kernel: int = 1,
    pool_mode: str = "max",
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean attention each cached key receives from a window of W queries; [B, Hkv, N] fp32.

    ``queries`` [B, Hq, W, D] (post-RoPE, the last W positions), ``keys`` [B, Hkv, N, D]. Query heads
    are grouped per KV head (GQA); softmax over the keys; the mean is over the group's heads and the
    W queries. With ``causal``, query w (absolute position N - W + w) sees only keys up to itself.
    Then optional same-length 1-D pooling (kernel 5-7 in SnapKV / R-KV). Memory: the [W, N] scores of
    one (batch, head) are built ``chunk_size`` keys at a time, in two passes (row LSE, then column sums).
    """
    b, hq, hkv, w, n, d = check_qk(queries, keys)
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = queries.float().reshape(b, hkv, g * w, d)
    k = keys.float()
    qpos = (n - w + torch.arange(w, device=keys.device)).repeat(g)  # [G*W]
    lse = torch.full((b, hkv, g * w), float("-inf"), device=keys.device)
    for s in range(0, n, chunk_size):  # pass 1: row log-sum-exp
        sc = torch.einsum("bhqd,bhkd->bhqk", q, k[:, :, s : s + chunk_size]) * scale
        if causal:
            kpos = torch.arange(s, min(n, s + chunk_size), device=keys.device)
            sc = sc.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        lse = torch.logaddexp(lse, torch.logsumexp(sc, dim=-1))
    out = torch.empty(b, hkv, n, device=keys.device)
    for s in range(0, n, chunk_size):  # pass 2: column sums of the probabilities
        sc = torch.einsum("bhqd,bhkd->bhqk", q, k[:, :, s : s + chunk_size]) * scale
        if causal:
            kpos = torch.arange(s, min(n, s + chunk_size), device=keys.device)
            sc = sc.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        out[:, :, s : s + chunk_size] = torch.exp(sc - lse[..., None]).sum(dim=2) / (g * w)
    return pool1d(out, pool_kernel, pool_mode)


def window_attention_mass(queries: torch.Tensor, keys: torch.Tensor, *, causal: bool = True,
                          scale: float | None = None, pool_kernel: int = 1, pool_mode: str = "max",
                          backend: str | None = None) -> torch.Tensor:
    """Mean attention each key [B, Hkv, N, D] receives from the window queries [B, Hq, W, D]; [B, Hkv, N]."""
    check_qk(queries, keys)
    if use_triton(backend, keys):
        out = triton_impl("window_attention_mass").window_attention_mass(queries, keys, causal=causal, scale=scale)
        return pool1d(out, pool_kernel, pool_mode)
    return window_attention_mass_reference(queries, keys, causal=causal, scale=scale, pool_kernel=pool_kernel,
                                           pool_mode=pool_mode)

