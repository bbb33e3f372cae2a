"""Pure-torch reference implementations (also the CPU path), chunked over rows."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenScores(NamedTuple):
    surprisal: torch.Tensor | None  # [N] -log p(target), fp32 (None without targets)
    entropy: torch.Tensor  # [N] entropy of the row distribution, fp32
    lse: torch.Tensor  # [N] log-sum-exp of the (temperature-scaled) logits, fp32


def _check(logits: torch.Tensor, targets: torch.Tensor | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if targets is not None:
        if targets.shape != (logits.shape[0],):
            raise ValueError(f"targets must be [{logits.shape[0]}], got {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
            raise ValueError(f"target ids out of range [0, {logits.shape[1]})")


def token_scores(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> TokenScores:
    """Surprisal ``-log p(target)``, entropy and log-sum-exp per row of ``logits`` [N, V].

    Computed in fp32, ``chunk_size`` rows at a time. Rows that are entirely ``-inf`` give ``nan``.
    """
    _check(logits, targets)
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    n = logits.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n, dtype=torch.float32, device=logits.device)
    sur = torch.empty(n, dtype=torch.float32, device=logits.device) if targets is not None else None
    for s in range(0, n, chunk_size):
        x = logits[s : s + chunk_size].float()
        if temperature != 1.0:
            x = x / temperature
        m = x.amax(dim=-1, keepdim=True)
        xs = x - m  # shifted: <= 0, keeps the entropy sum free of cancellation against a large lse
        z = torch.logsumexp(xs, dim=-1)
        p = torch.exp(xs - z[:, None])
        # entropy = z - sum p * xs ; masked (-inf) entries contribute 0
        pxs = torch.where(p > 0, p * xs, torch.zeros_like(xs))
        ent[s : s + chunk_size] = z - pxs.sum(-1)
        row_lse = z + m.squeeze(-1)
        lse[s : s + chunk_size] = row_lse
        if sur is not None:
            t = targets[s : s + chunk_size].long()
            sur[s : s + chunk_size] = row_lse - x.gather(1, t[:, None]).squeeze(1)
    return TokenScores(sur, ent, lse)
