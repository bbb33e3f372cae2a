"""``key_redundancy``: R-KV's redundancy score of each cached key (mean cosine similarity to the others).

The sum form is O(N * d) torch on every backend; the recent-copy exemption needs, per key, its most
recent similar key: O(N^2 * d), chunked torch in the reference, streamed over key blocks by the
Triton kernel (:mod:`thinkpress.kernels.triton.key_redundancy`).
"""

from __future__ import annotations

import torch

from thinkpress.kernels.ops._common import triton_impl, use_triton


def check_keys(keys: torch.Tensor) -> None:
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
        raise ValueError(f"keys must be [B, H, N, D], got {tuple(getattr(keys, 'shape', ()))}")
    if not keys.is_floating_point():
        raise TypeError(f"keys must be floating point, got {keys.dtype}")
    if keys.numel() == 0:
        raise ValueError("keys must not be empty")


def last_similar(keys: torch.Tensor, threshold: float, *, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key i: the largest index j != i with cos(k_i, k_j) > threshold (-1 if none) and that cosine.

    The only O(N^2 * d) part of R-KV's redundancy, computed ``chunk_size`` rows at a time.
    """
    check_keys(keys)
    n = keys.shape[2]
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    idx = torch.arange(n, device=keys.device)
    last = torch.empty(keys.shape[:3], dtype=torch.long, device=keys.device)
    val = torch.empty(keys.shape[:3], device=keys.device)
    for s in range(0, n, chunk_size):
        rows = idx[s : s + chunk_size]
        sim = torch.einsum("bhid,bhjd->bhij", kn[:, :, s : s + chunk_size], kn)  # [B, H, c, N]
        similar = (sim > threshold) & (idx[None, :] != rows[:, None])
        j = torch.where(similar, idx, -1).amax(dim=-1)
        last[:, :, s : s + chunk_size] = j
        val[:, :, s : s + chunk_size] = torch.where(j >= 0, sim.gather(-1, j.clamp(min=0)[..., None])[..., 0], 0.0)
    return last, val


def key_redundancy_reference(
    keys: torch.Tensor, *, exemption_threshold: float | None = None, chunk_size: int = 1024, find_last=None
) -> torch.Tensor:
    """R-KV's redundancy before its softmax: the mean cosine similarity each key gets from the keys; [B, H, N] fp32.

    ``S`` = pairwise cosine similarity of the unit keys of one head, diagonal zeroed; the score of key
    j is the mean over rows i of ``S[i, j]`` (divided by N, as R-KV's ``mean(dim=-2)``). Without
    ``exemption_threshold`` this is the O(N*d) sum form ``(k_j . sum_i k_i - 1) / N``. With it (R-KV),
    each row i first zeroes ``S[i, j*]`` for its most recent similar key j* (``cos > threshold``), so
    the latest copy of a repeated token is spared: by symmetry that is the sum form minus a scatter of
    the exempted cosines, and only :func:`last_similar` is O(N^2 * d). (R-KV's code zeroes column 0
    when a row has no similar key; here nothing is exempted then.) R-KV then takes ``softmax`` over keys.
    ``find_last(keys, threshold)`` replaces :func:`last_similar` (the Triton kernel plugs in here).
    """
    check_keys(keys)
    n = keys.shape[2]
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    col = (kn * kn.sum(dim=2, keepdim=True)).sum(-1) - (kn * kn).sum(-1)
    if exemption_threshold is not None:
        if find_last is None:
            last, val = last_similar(keys, exemption_threshold, chunk_size=chunk_size)
        else:
            last, val = find_last(keys, exemption_threshold)
        col = col - scatter_exempt(last, val, n)
    return col / n


def scatter_exempt(last: torch.Tensor, val: torch.Tensor, n: int) -> torch.Tensor:
    """Sum, per key j, of the cosines that rows exempted at j (rows with no similar key add nothing)."""
    out = torch.zeros(last.shape[:-1] + (n + 1,), device=val.device)
    target = torch.where(last >= 0, last, n)  # row without a similar key -> the spill slot n
    out.scatter_add_(-1, target, val)
    return out[..., :n]


def key_redundancy(keys: torch.Tensor, *, exemption_threshold: float | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """R-KV's redundancy (before the softmax over keys) of keys [B, H, N, D]; [B, H, N] fp32.

    The O(N*d) sum form is computed with torch on every backend (a normalisation, a sum and a
    matrix-vector product: memory-bound, nothing to fuse); with ``exemption_threshold`` the O(N^2*d)
    search for each key's most recent similar copy runs in Triton (or chunked torch).
    """
    check_keys(keys)
    triton = exemption_threshold is not None and use_triton(backend, keys)
    return key_redundancy_reference(keys, exemption_threshold=exemption_threshold,
                                    find_last=triton_impl("key_redundancy").last_similar if triton else None)
