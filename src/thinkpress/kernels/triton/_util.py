"""Helpers of the Triton launchers."""

from __future__ import annotations

import torch
import triton


def rows(x: torch.Tensor) -> torch.Tensor:
    """Rows may have any stride; the vocabulary dimension must be contiguous."""
    return x if x.stride(1) == 1 else x.contiguous()


def block(v: int) -> int:
    return min(4096, triton.next_power_of_2(v))
