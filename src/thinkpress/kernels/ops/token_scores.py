"""``token_scores``: surprisal, entropy, log-sum-exp and top-1 margin per row of logits [N, V].

The reference is chunked torch (the CPU path; peak memory O(chunk * V), not O(N * V)); the Triton
kernel (:mod:`thinkpress.kernels.triton.token_scores`) reads each row once with an online softmax.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from thinkpress.kernels.ops._common import auto_chunk, check_logits, check_temperature, triton_impl, use_triton


class TokenScores(NamedTuple):
    surprisal: torch.Tensor | None  # [N] -log p(target), fp32 (None without targets)
    entropy: torch.Tensor  # [N] entropy of the row distribution (nats), fp32
    lse: torch.Tensor  # [N] log-sum-exp of the (temperature-scaled) logits, fp32
    margin: torch.Tensor | None = None  # [N] p(top-1) - p(top-2), fp32 (when asked for)


def check_targets(targets: torch.Tensor | None, logits: torch.Tensor) -> None:
    if targets is None:
        return
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must be [{logits.shape[0]}], got {tuple(targets.shape)}")
    if targets.is_floating_point():
        raise TypeError(f"targets must be integer ids, got {targets.dtype}")
    if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]:
        raise ValueError(f"target ids out of range [0, {logits.shape[1]})")


def token_scores_reference(
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
    check_temperature(temperature)
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


def token_scores(logits: torch.Tensor, targets: torch.Tensor | None = None, *, temperature: float = 1.0,
                 margin: bool = False, backend: str | None = None) -> TokenScores:
    """Per row of ``logits`` [N, V]: ``-log p(target)``, entropy, log-sum-exp and (``margin``) p1 - p2, in fp32."""
    check_logits(logits)
    check_targets(targets, logits)
    check_temperature(temperature)
    if use_triton(backend, logits):
        return triton_impl("token_scores").token_scores(logits, targets, temperature=temperature, margin=margin)
    return token_scores_reference(logits, targets, temperature=temperature, margin=margin)
