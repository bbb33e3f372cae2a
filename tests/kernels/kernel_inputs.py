"""Shared inputs of the kernel tests."""

import torch

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=1e-4, rtol=1e-4)}


def logits(n, v, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype)


def qk(b, hq, hkv, w, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, w, d, generator=g).to(dtype), torch.randn(b, hkv, n, d, generator=g).to(dtype))
