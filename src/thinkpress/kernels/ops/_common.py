"""What every op shares: input checks, chunk sizing and the backend dispatch."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from types import ModuleType

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(backend: str | None, tensor: torch.Tensor) -> bool:
    """Whether an op runs its Triton kernel: ``None`` = on CUDA tensors when Triton is installed;
    ``"triton"`` = always (CPU tensors need ``TRITON_INTERPRET=1``); ``"torch"`` = never."""
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


def triton_impl(op: str) -> ModuleType:
    """The Triton kernel module of ``op``, imported on first use (so tests can set ``TRITON_INTERPRET`` first)."""
    return importlib.import_module(f"thinkpress.kernels.triton.{op}")


def check_temperature(temperature: float) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def auto_chunk(v: int, budget_bytes: int = 8 << 20) -> int:
    """Rows per chunk so that one fp32 [chunk, V] temporary is about ``budget_bytes`` (cache-sized)."""
    return max(1, budget_bytes // (4 * v))


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(logits.shape)})")
