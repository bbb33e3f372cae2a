"""Pure-torch references (also the CPU path), chunked so that peak memory is O(chunk * V), not O(N * V).

Every function accumulates in fp32 whatever the input dtype, and validates its input: mismatched
shapes, integer logits, out-of-range target ids and empty tensors are errors, never a silent answer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class TokenScores(NamedTuple):
    surprisal: torch.Tensor | None  # [N] -log p(target), fp32 (None without targets)
    entropy: torch.Tensor  # [N] entropy of the row distribution (nats), fp32
    lse: torch.Tensor  # [N] log-sum-exp of the (temperature-scaled) logits, fp32
    margin: torch.Tensor | None = None  # [N] p(top-1) - p(top-2), fp32 (when asked for)


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(logits.shape)})")


def check_targets(targets: torch.Tensor | None, logits: torch.Tensor) -> None:
    if targets is None:
        return
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must be [{logits.shape[0]}], got {tuple(targets.shape)}")
    if targets.is_floating_point():
        raise TypeError(f"targets must be integer ids, got {targets.dtype}")
    if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]:
        raise ValueError(f"target ids out of range [0, {logits.shape[1]})")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def auto_chunk(v: int, budget_bytes: int = 8 << 20) -> int:
    """Rows per chunk so that one fp32 [chunk, V] temporary is about ``budget_bytes`` (cache-sized)."""
    return max(1, budget_bytes // (4 * v))


def token_scores(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    margin: bool = False,
    chunk_size: int | None = None,
) -> TokenScores:
    """Surprisal ``-log p(target)``, entropy, log-sum-exp (and top-1 margin) per row of ``logits`` [N, V].

    ``chunk_size`` rows at a time (default: about 8 MB of fp32 per temporary), fp32 math. Rows that
    are entirely ``-inf`` give ``nan``.
    """
    check_logits(logits)
    check_targets(targets, logits)
    _check_temperature(temperature)
    n, v = logits.shape
    chunk_size = chunk_size or auto_chunk(v)
    dev = logits.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev)
    sur = torch.empty(n, dtype=torch.float32, device=dev) if targets is not None else None
    mar = torch.empty(n, dtype=torch.float32, device=dev) if margin else None
    for s in range(0, n, chunk_size):
        sl = slice(s, s + chunk_size)
        x = logits[sl].float()
        if temperature != 1.0:
            x = x / temperature
        lp = torch.log_softmax(x, dim=-1)
        top = x.argmax(dim=-1, keepdim=True)
        row_lse = (x.gather(1, top) - lp.gather(1, top)).squeeze(1)  # lse = x_i - log p_i at any finite i
        p = lp.exp()
        lse[sl] = row_lse
        # p * log p is nan only where p == 0 and log p == -inf (masked entries): those contribute 0
        ent[sl] = torch.where(torch.isnan(row_lse), row_lse, -(p * lp).nansum(dim=-1))
        if sur is not None:
            sur[sl] = -lp.gather(1, targets[sl].long()[:, None]).squeeze(1)
        if mar is not None:
            if v == 1:
                mar[sl] = 1.0
            else:
                t2 = p.topk(2, dim=-1).values
                mar[sl] = t2[:, 0] - t2[:, 1]
    return TokenScores(sur, ent, lse, mar)


def kl_div(
    logits_p: torch.Tensor, logits_q: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """KL(p || q) per row, p = softmax(logits_p / T), q = softmax(logits_q / T); [N] fp32 (nats)."""
    check_logits(logits_p, "logits_p")
    check_logits(logits_q, "logits_q")
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} differ in shape")
    _check_temperature(temperature)
    out = torch.empty(logits_p.shape[0], dtype=torch.float32, device=logits_p.device)
    chunk_size = chunk_size or auto_chunk(logits_p.shape[1])
    for s in range(0, logits_p.shape[0], chunk_size):
        a = logits_p[s : s + chunk_size].float() / temperature
        b = logits_q[s : s + chunk_size].float() / temperature
        lp = torch.log_softmax(a, dim=-1)
        lq = torch.log_softmax(b, dim=-1)
        # p * (log p - log q): nan only where p == 0 (masked in p), which contributes 0
        out[s : s + chunk_size] = (lp.exp() * (lp - lq)).nansum(-1)
    return out


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


def window_attention_mass(
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


def _check_keys(keys: torch.Tensor) -> None:
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
    _check_keys(keys)
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


def key_redundancy(
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
    _check_keys(keys)
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

