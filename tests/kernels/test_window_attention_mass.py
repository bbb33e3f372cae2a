"""window_attention_mass: the Triton kernels against the chunked reference, an explicit softmax and pooling."""

import pytest
import torch
from kernel_inputs import TOL, qk

from thinkpress.kernels import window_attention_mass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 5, 4), (2, 6, 2, 3, 37, 12)])  # GQA group 3, odd N and D
def test_window_attention_mass_parity_and_topk(dtype, causal, shape):
    q, k = qk(*shape, dtype)
    a = window_attention_mass(q, k, causal=causal, backend="triton")
    b = window_attention_mass(q, k, causal=causal, backend="torch")
    torch.testing.assert_close(a, b, **TOL[dtype])
    # each query's probabilities sum to 1, so the mean over queries sums to 1 over keys
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-4, rtol=0)
    kk = max(1, shape[4] // 3)
    assert torch.equal(a.topk(kk, -1).indices.sort(-1).values, b.topk(kk, -1).indices.sort(-1).values)


def test_window_attention_mass_matches_explicit_softmax_and_pooling():
    q, k = qk(1, 4, 2, 3, 10, 8, torch.float32)
    sc = torch.einsum("bhwd,bhnd->bhwn", q, k.repeat_interleave(2, dim=1)) / 8 ** 0.5
    qpos = torch.arange(7, 10)
    sc = sc.masked_fill(torch.arange(10)[None, :] > qpos[:, None], float("-inf"))
    ref = sc.softmax(-1).reshape(1, 2, 2 * 3, 10).mean(2)
    torch.testing.assert_close(window_attention_mass(q, k, backend="triton"), ref, atol=1e-6, rtol=1e-5)
    pooled = window_attention_mass(q, k, pool_kernel=3, backend="triton")
    torch.testing.assert_close(pooled[..., 4], ref[..., 3:6].amax(-1), atol=1e-6, rtol=1e-5)
