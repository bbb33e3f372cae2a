"""Token-importance and KV-cache scoring kernels.

One public function per score; each validates its input, then dispatches:

* ``backend=None`` (default): Triton for CUDA tensors when Triton is installed, the torch reference
  otherwise (the CPU path);
* ``backend="triton"``: force the Triton kernel (on CPU tensors this needs ``TRITON_INTERPRET=1`` set
  before the first Triton call: the interpreter, for tests);
* ``backend="torch"``: force the chunked torch reference.

Functions: :func:`token_scores` (surprisal, entropy, log-sum-exp, optional top-1 margin),
:func:`kl_div` (per-row KL between two logit tensors), :func:`window_attention_mass` (attention each
cached key receives from a window of queries, GQA-aware, optional pooling) and
:func:`key_redundancy` (R-KV's mean cosine similarity, sum form or with the recent-copy exemption).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from thinkpress.kernels import reference
from thinkpress.kernels.reference import TokenScores, check_logits, check_qk, check_targets, pool1d

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON", "TokenScores", "key_redundancy", "kl_div", "token_scores", "window_attention_mass"]


def _triton_ops():
    from thinkpress.kernels import triton_ops

    return triton_ops


def use_triton(backend: str | None, tensor: torch.Tensor) -> bool:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    if backend is None:
        return HAS_TRITON and tensor.is_cuda
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the 'triton' package")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter), "
                           "set before the first Triton call")
    return True


def token_scores(logits: torch.Tensor, targets: torch.Tensor | None = None, *, temperature: float = 1.0,
                 margin: bool = False, backend: str | None = None) -> TokenScores:
    """Per row of ``logits`` [N, V]: ``-log p(target)``, entropy, log-sum-exp and (``margin``) p1 - p2, in fp32."""
    check_logits(logits)
    check_targets(targets, logits)
    reference._check_temperature(temperature)
    if use_triton(backend, logits):
        return _triton_ops().token_scores(logits, targets, temperature=temperature, margin=margin)
    return reference.token_scores(logits, targets, temperature=temperature, margin=margin)


def kl_div(logits_p: torch.Tensor, logits_q: torch.Tensor, *, temperature: float = 1.0,
           backend: str | None = None) -> torch.Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)) per row, [N] fp32, in one pass over both tensors."""
    check_logits(logits_p, "logits_p")
    check_logits(logits_q, "logits_q")
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} differ in shape")
    reference._check_temperature(temperature)
    if use_triton(backend, logits_p):
        return _triton_ops().kl_div(logits_p, logits_q, temperature=temperature)
    return reference.kl_div(logits_p, logits_q, temperature=temperature)


def window_attention_mass(queries: torch.Tensor, keys: torch.Tensor, *, causal: bool = True,
                          scale: float | None = None, pool_kernel: int = 1, pool_mode: str = "max",
                          backend: str | None = None) -> torch.Tensor:
    """Mean attention each key [B, Hkv, N, D] receives from the window queries [B, Hq, W, D]; [B, Hkv, N]."""
    check_qk(queries, keys)
    if use_triton(backend, keys):
        out = _triton_ops().window_attention_mass(queries, keys, causal=causal, scale=scale)
        return pool1d(out, pool_kernel, pool_mode)
    return reference.window_attention_mass(queries, keys, causal=causal, scale=scale, pool_kernel=pool_kernel,
                                           pool_mode=pool_mode)


def key_redundancy(keys: torch.Tensor, *, exemption_threshold: float | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """R-KV's redundancy (before the softmax over keys) of keys [B, H, N, D]; [B, H, N] fp32.

    The O(N*d) sum form is computed with torch on every backend (a normalisation, a sum and a
    matrix-vector product: memory-bound, nothing to fuse); with ``exemption_threshold`` the O(N^2*d)
    search for each key's most recent similar copy runs in Triton (or chunked torch).
    """
    reference._check_keys(keys)
    triton = exemption_threshold is not None and use_triton(backend, keys)
    return reference.key_redundancy(keys, exemption_threshold=exemption_threshold,
                                    find_last=_triton_ops().last_similar if triton else None)
