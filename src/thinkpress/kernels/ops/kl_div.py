"""``kl_div``: KL(softmax(p / T) || softmax(q / T)) per row of two logit tensors [N, V], fp32.

The reference is chunked torch; the Triton kernel (:mod:`thinkpress.kernels.triton.kl_div`) keeps an
online max and sum-exp for both rows and reads each once.
"""

from __future__ import annotations

import torch

from thinkpress.kernels.ops._common import auto_chunk, check_logits, check_temperature, triton_impl, use_triton


def kl_div_reference(
    logits_p: torch.Tensor, logits_q: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """KL(p || q) per row, p = softmax(logits_p / T), q = softmax(logits_q / T); [N] fp32 (nats)."""
    check_logits(logits_p, "logits_p")
    check_logits(logits_q, "logits_q")
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} differ in shape")
    check_temperature(temperature)
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


def kl_div(logits_p: torch.Tensor, logits_q: torch.Tensor, *, temperature: float = 1.0,
           backend: str | None = None) -> torch.Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)) per row, [N] fp32, in one pass over both tensors."""
    check_logits(logits_p, "logits_p")
    check_logits(logits_q, "logits_q")
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} differ in shape")
    check_temperature(temperature)
    if use_triton(backend, logits_p):
        return triton_impl("kl_div").kl_div(logits_p, logits_q, temperature=temperature)
    return kl_div_reference(logits_p, logits_q, temperature=temperature)
